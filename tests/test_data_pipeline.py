"""grain loaders on a small image folder whose every image names itself (channel 0 = 10 * id)."""

import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from jaxclf.data import pipeline, sources
from jaxclf.data.sampler import GlobalBatchSampler

NUM_IMAGES = 24  # 3 classes of 8
TRAIN_OPS = "decode|inception_crop(4)|flip_lr"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> sources.LabelledFiles:
    root = tmp_path_factory.mktemp("images")
    for i in range(NUM_IMAGES):
        image = np.zeros((6, 7, 3), np.uint8)
        image[..., 0] = 10 * i  # survives any crop, resize or flip: identifies the example
        image[..., 1] = np.arange(7) * 35  # makes crops and flips visible
        os.makedirs(root / "train" / f"c{i // 8}", exist_ok=True)
        Image.fromarray(image).save(root / "train" / f"c{i // 8}" / f"{i:02d}.png")
    os.makedirs(root / "val" / "c0")
    Image.new("RGB", (1, 1)).save(root / "val" / "c0" / "unused.png")
    return sources.load_image_folder_splits(str(root))["train"]


def _ids(batch: dict) -> np.ndarray:
    return batch["image"][:, 0, 0, 0] // 10


def _take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.keys() == e.keys()
        for key in g:
            np.testing.assert_array_equal(g[key], e[key])


def _loader(source, *, seed=0, num_workers=0, global_batch_size=8, ops_spec=TRAIN_OPS):
    return pipeline.make_train_loader(
        source, ops_spec, global_batch_size=global_batch_size, seed=seed, num_workers=num_workers
    )


def _fake_processes(monkeypatch, index: int, count: int) -> None:
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: count)


def test_train_batches_cover_each_epoch_once_and_reshuffle(folder):
    batches = _take(iter(_loader(folder)), 6)  # two epochs of 24
    for batch in batches:
        assert set(batch) == {"image", "label", "skipped"} and not batch["skipped"].any()
        assert batch["image"].shape == (8, 4, 4, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
        np.testing.assert_array_equal(batch["label"], _ids(batch) // 8)
    epoch1 = np.concatenate([_ids(b) for b in batches[:3]])
    epoch2 = np.concatenate([_ids(b) for b in batches[3:]])
    assert sorted(epoch1) == sorted(epoch2) == list(range(NUM_IMAGES))
    assert not np.array_equal(epoch1, epoch2)


def test_train_stream_is_fixed_by_the_seed(folder):
    first = _take(iter(_loader(folder, seed=0)), 3)
    _assert_same_batches(_take(iter(_loader(folder, seed=0)), 3), first)
    other = _take(iter(_loader(folder, seed=1)), 3)
    assert not np.array_equal(_ids(other[0]), _ids(first[0]))


def test_seeds_give_unrelated_random_streams_not_shifted_copies():
    # With key=seed+position, seed 1's stream was seed 0's shifted by one position.
    weights = np.ones(100)
    zero, one = (GlobalBatchSampler(100, 10, 1, seed, weights) for seed in (0, 1))
    draws = lambda sampler: [sampler.record_at(p) for p in range(200)]
    augment = lambda sampler: [sampler[i].rng.random() for i in range(200)]
    assert draws(zero)[1:] != draws(one)[:-1] and augment(zero)[1:] != augment(one)[:-1]
    assert draws(zero) == draws(GlobalBatchSampler(100, 10, 1, 0, weights))  # still fixed by the seed
    # The balanced-sampling draw and the augmentation stream of one position are unrelated.
    assert not set(np.round([zero._draw(p) for p in range(200)], 12)) & set(np.round(augment(zero), 12))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_restored_iterator_continues_exactly(folder, num_workers):
    expected = _take(iter(_loader(folder)), 5)  # in-process reference: workers change nothing
    iterator = iter(_loader(folder, num_workers=num_workers))
    _assert_same_batches(_take(iterator, 2), expected[:2])
    state = iterator.get_state()
    _assert_same_batches(_take(iterator, 3), expected[2:])

    restored = iter(_loader(folder, num_workers=num_workers))
    restored.set_state(state)
    _assert_same_batches(_take(restored, 3), expected[2:])


def test_iterator_position_survives_an_orbax_checkpoint(folder, tmp_path):
    manager = ocp.CheckpointManager(tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(create=True))
    iterator = iter(_loader(folder))
    _take(iterator, 2)
    manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    expected = _take(iterator, 2)

    restored = iter(_loader(folder))
    manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    _assert_same_batches(_take(restored, 2), expected)
    manager.close()


def test_train_shards_are_disjoint_across_processes(folder, monkeypatch):
    seen = []
    for index in range(2):
        _fake_processes(monkeypatch, index, 2)
        batches = _take(iter(_loader(folder)), 3)  # one epoch of this process's 12
        assert batches[0]["image"].shape[0] == 4
        seen.append(set(np.concatenate([_ids(b) for b in batches]).tolist()))
    assert len(seen[0]) == len(seen[1]) == 12
    assert seen[0] | seen[1] == set(range(NUM_IMAGES))


def test_batch_size_must_divide_over_processes(folder, monkeypatch):
    _fake_processes(monkeypatch, 0, 3)
    with pytest.raises(ValueError, match="batch_size=8"):
        _loader(folder)
    with pytest.raises(ValueError, match="batch_size=8"):
        pipeline.eval_batches(folder, "decode", global_batch_size=8, num_workers=0)


@pytest.mark.parametrize(
    "num_examples, processes, global_batch_size, num_workers",
    [(23, 1, 8, 0), (23, 1, 8, 1), (23, 1, 8, 2), (23, 2, 8, 0), pytest.param(23, 2, 8, 3, marks=pytest.mark.slow),
     (23, 3, 12, 0), (2, 3, 3, 0)],
)
def test_eval_batches_are_full_and_count_every_example_once(
    folder, monkeypatch, num_examples, processes, global_batch_size, num_workers
):
    # With several workers grain batches every workers-th record in each worker: without padding
    # for that, the last batches were short (a recompile, or an indivisible batch on a mesh).
    subset = sources.LabelledFiles(folder.paths[:num_examples], folder.labels[:num_examples], folder.class_names)
    local_batch = global_batch_size // processes
    seen, counts = [], set()
    for index in range(processes):
        _fake_processes(monkeypatch, index, processes)
        batches = list(
            pipeline.eval_batches(
                subset, "decode|central_crop(4)", global_batch_size=global_batch_size, num_workers=num_workers
            )
        )
        counts.add(len(batches))
        for batch in batches:
            assert batch["image"].shape == (local_batch, 4, 4, 3) and batch["image"].dtype == np.uint8
            assert batch["label"].dtype == np.int32 and batch["mask"].dtype == bool
            mask = batch["mask"]
            np.testing.assert_array_equal(batch["label"][mask], _ids(batch)[mask] // 8)
            np.testing.assert_array_equal(batch["index"][mask], _ids(batch)[mask])  # the row's record
            assert (batch["index"][~mask] == -1).all()
            seen += _ids(batch)[mask].tolist()
    assert len(counts) == 1  # the same count on every process, even where a shard is shorter or empty
    assert sorted(seen) == list(range(num_examples))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_loader_serves_identical_passes_from_the_same_workers(folder, num_workers):
    loader = pipeline.EvalLoader(folder, "decode|central_crop(4)", global_batch_size=8, num_workers=num_workers)

    def rows(batches):
        return sorted((int(i), int(x)) for b in batches for i, x in zip(b["index"][b["mask"]], _ids(b)[b["mask"]]))

    first = list(loader.one_pass())
    assert len(first) == loader.num_batches and rows(first) == [(i, i) for i in range(len(folder))]
    partial = loader.one_pass()
    next(partial)
    partial.close()  # a pass left part-way: the next one must still be whole
    for _ in range(2):
        assert rows(loader.one_pass()) == rows(first)


def test_eval_rejects_random_ops_and_specs_start_with_decode(folder):
    with pytest.raises(ValueError, match="random"):
        pipeline.eval_batches(folder, TRAIN_OPS, global_batch_size=8, num_workers=0)
    with pytest.raises(ValueError, match="must start with decode"):
        _loader(folder, ops_spec="inception_crop(4)|decode")


def test_resolve_num_workers(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert pipeline.resolve_num_workers(-1) == 3
    assert pipeline.resolve_num_workers(0) == 0
    assert pipeline.resolve_num_workers(5) == 5
    with pytest.raises(ValueError, match="num_workers=-2"):
        pipeline.resolve_num_workers(-2)
