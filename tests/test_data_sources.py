"""Sources (image folders, CSV/JSONL lists, TFDS by name) and the digits writer, on data the tests write."""

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import sklearn.datasets
from PIL import Image

from jaxclf import data
from jaxclf.config import base_config
from jaxclf.data import digits, listfile, pipeline, sources


def _touch_image(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fmt = "JPEG" if path.lower().endswith((".jpg", ".jpeg")) else "PNG"
    Image.new("RGB", (2, 2)).save(path, format=fmt)


def _make_split(root, split: str, sizes: dict[str, int]) -> None:
    for name, n in sizes.items():
        for i in range(n):
            _touch_image(os.path.join(root, split, name, f"{i:03d}.png"))


def test_classes_labels_and_counts_skip_hidden_and_non_image_files(tmp_path):
    for rel in ["train/dog/a.png", "train/dog/b.JPG", "train/dog/nested/c.jpeg", "train/cat/d.png", "val/cat/e.png"]:
        _touch_image(str(tmp_path / rel))
    _touch_image(str(tmp_path / "train/dog/.ipynb_checkpoints/x.png"))
    _touch_image(str(tmp_path / "train/dog/._b.png"))  # macOS AppleDouble companion
    _touch_image(str(tmp_path / "train/.hidden_class/y.png"))
    (tmp_path / "train/dog/.DS_Store").write_bytes(b"\0\1")
    (tmp_path / "train/dog/notes.txt").write_text("not an image")
    (tmp_path / "train/README.md").write_text("a file beside the class folders")

    splits = sources.load_image_folder_splits(str(tmp_path))
    train, val = splits["train"], splits["val"]

    assert train.class_names == ("cat", "dog") == val.class_names
    assert [os.path.relpath(p, tmp_path) for p in train.paths] == [
        "train/cat/d.png",
        "train/dog/a.png",
        "train/dog/b.JPG",
        "train/dog/nested/c.jpeg",
    ]
    np.testing.assert_array_equal(train.labels, [0, 1, 1, 1])
    assert train.labels.dtype == np.int32
    assert train.class_counts() == {"cat": 1, "dog": 3}
    assert val.class_counts() == {"cat": 1, "dog": 0}
    example = train[2]
    assert example == {"path": train.paths[2], "label": 1} and isinstance(example["label"], np.int32)
    assert len(train) == 4


def test_val_fraction_split_is_stratified_disjoint_complete_and_seeded(tmp_path):
    sizes = {"a": 10, "b": 20, "c": 7}
    _make_split(tmp_path, "train", sizes)

    splits = sources.load_image_folder_splits(str(tmp_path), val_fraction=0.3, split_seed=1)
    train, val = splits["train"], splits["val"]

    assert val.class_counts() == {"a": 3, "b": 6, "c": 2}
    assert train.class_counts() == {"a": 7, "b": 14, "c": 5}
    assert not set(train.paths) & set(val.paths)
    all_paths = {os.path.join(tmp_path, "train", n, f"{i:03d}.png") for n, k in sizes.items() for i in range(k)}
    assert set(train.paths) | set(val.paths) == all_paths
    for split in (train, val):  # labels still follow the class folder of each file
        assert [split.class_names[y] for y in split.labels] == [p.split(os.sep)[-2] for p in split.paths]

    again = sources.load_image_folder_splits(str(tmp_path), val_fraction=0.3, split_seed=1)["val"]
    other = sources.load_image_folder_splits(str(tmp_path), val_fraction=0.3, split_seed=2)["val"]
    assert again.paths == val.paths
    assert other.paths != val.paths


def test_repr_identifies_the_data_not_its_location(tmp_path):
    # grain refuses to restore an iterator state whose source repr differs: a copied data set must
    # still resume, a changed one must not.
    _make_split(tmp_path / "a", "train", {"x": 3, "y": 2})
    _make_split(tmp_path / "a", "val", {"x": 1})
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    original = sources.load_image_folder_splits(str(tmp_path / "a"))["train"]
    assert repr(sources.load_image_folder_splits(str(tmp_path / "b"))["train"]) == repr(original)
    assert len(repr(original)) < 100

    _touch_image(str(tmp_path / "b/train/y/extra.png"))
    assert repr(sources.load_image_folder_splits(str(tmp_path / "b"))["train"]) != repr(original)


@pytest.mark.parametrize(
    "layout, kwargs, named_path",
    [
        (None, {}, ""),
        ({"val": {"a": 1}}, {}, "train"),
        ({"train": {"a": 2, "empty": 0}, "val": {"a": 1}}, {}, "train/empty"),
        ({"train": {"a": 2}, "val": {"a": 1, "b": 1}}, {}, "val"),
        ({"train": {"a": 2}}, {}, "val"),
        ({"train": {"a": 2}, "val": {"a": 1}}, {"val_fraction": 0.1}, "val"),
        ({"train": {"a": 1}}, {"val_fraction": 0.5}, "train"),
    ],
    ids=[
        "missing_root", "missing_train", "empty_class", "class_only_in_val", "no_val", "val_and_fraction",
        "nothing_held_out",
    ],
)
def test_errors_name_the_path(tmp_path, layout, kwargs, named_path):
    root = tmp_path / "data"
    for split, sizes in (layout or {}).items():
        _make_split(root, split, sizes)
        for name in sizes:
            os.makedirs(root / split / name, exist_ok=True)
            (root / split / name / ".DS_Store").write_bytes(b"")  # an empty class holds only this
    with pytest.raises(sources.DataError) as info:
        sources.load_image_folder_splits(str(root), **kwargs)
    assert str(root / named_path) in str(info.value)


def test_write_digits_folder_writes_once(tmp_path, monkeypatch):
    root = str(tmp_path / "digits")
    assert digits.write_digits_folder(root, image_size=12) == root

    splits = sources.load_image_folder_splits(root)
    assert splits["train"].class_names == tuple(str(d) for d in range(10))
    assert len(splits["train"]) + len(splits["val"]) == 1797
    assert len(splits["val"]) == 360  # sklearn rounds the 20% test share up
    assert min(splits["val"].class_counts().values()) >= 35  # stratified: about 36 per class
    pngs = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".png")]
    assert len(pngs) == 1797
    with Image.open(splits["train"].paths[0]) as img:
        assert (img.mode, img.size) == ("L", (12, 12))
        pixels = np.asarray(img)
    assert pixels.dtype == np.uint8 and pixels.max() > 200  # 0..16 was spread over 0..255

    mtimes = {p: os.stat(p).st_mtime_ns for p in pngs}
    monkeypatch.setattr(sklearn.datasets, "load_digits", lambda: pytest.fail("rewrote a complete folder"))
    assert digits.write_digits_folder(root, image_size=12) == root
    assert {p: os.stat(p).st_mtime_ns for p in pngs} == mtimes
    with pytest.raises(sources.DataError, match="image_size"):
        digits.write_digits_folder(root, image_size=16)


def test_interrupted_digits_write_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    root = tmp_path / "digits"
    saves = []

    def save_then_fail(self, fp, *args, **kwargs):
        saves.append(fp)
        if len(saves) == 50:
            raise KeyboardInterrupt
        return original_save(self, fp, *args, **kwargs)

    original_save = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        digits.write_digits_folder(str(root), image_size=8)
    assert os.listdir(tmp_path) == []  # neither `root` nor the temporary folder


def test_fractions_70_15_15_split_each_class_and_a_test_folder_is_used(tmp_path):
    _make_split(tmp_path, "train", {"a": 20, "b": 40})
    splits = sources.load_image_folder_splits(str(tmp_path), val_fraction=0.15, test_fraction=0.15, split_seed=3)
    assert splits["val"].class_counts() == {"a": 3, "b": 6}
    assert splits["test"].class_counts() == {"a": 3, "b": 6}
    assert splits["train"].class_counts() == {"a": 14, "b": 28}
    parts = [set(splits[s].paths) for s in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert len(parts[0] | parts[1] | parts[2]) == 60
    # The val part does not depend on whether a test part is held out too.
    val_only = sources.load_image_folder_splits(str(tmp_path), val_fraction=0.15, split_seed=3)
    assert val_only["val"].paths == splits["val"].paths and "test" not in val_only

    _make_split(tmp_path, "test", {"b": 2})
    with_folder = sources.load_image_folder_splits(str(tmp_path), val_fraction=0.15, split_seed=3)
    assert with_folder["test"].class_counts() == {"a": 0, "b": 2}
    with pytest.raises(sources.DataError, match=f"{tmp_path}/test exists and test_fraction=0.15"):
        sources.load_image_folder_splits(str(tmp_path), val_fraction=0.15, test_fraction=0.15)
    with pytest.raises(sources.DataError, match="must stay below 1"):
        sources.load_image_folder_splits(str(tmp_path), val_fraction=0.6, test_fraction=0.5, test_split="none")


def _write_images(root, names):
    for name in names:
        _touch_image(os.path.join(root, name))


def test_csv_and_jsonl_lists_with_an_image_root(tmp_path):
    _write_images(tmp_path / "img", ["x1.jpg", "x2.PNG", "sub/x3.png", "x4.png", "x5.png"])
    (tmp_path / "img" / "train.csv").write_text(
        "filename,label,notes\nx1.jpg,dog,\nx2.PNG,cat,blurry\nsub/x3.png,dog,\nx4.png,10,\n"
    )
    (tmp_path / "img" / "val.jsonl").write_text('{"filename": "x5.png", "label": "cat"}\n\n')
    splits = listfile.load_list_splits(str(tmp_path / "img"), train_split="train.csv", val_split="val.jsonl",
                                       test_split="test.csv")
    train, val = splits["train"], splits["val"]
    assert set(splits) == {"train", "val"}
    assert train.class_names == ("10", "cat", "dog")  # sorted as text: not every label is a number
    assert [os.path.relpath(p, tmp_path / "img") for p in train.paths] == ["x4.png", "x2.PNG", "x1.jpg", "sub/x3.png"]
    np.testing.assert_array_equal(train.labels, [0, 1, 2, 2])
    assert val.class_counts() == {"10": 0, "cat": 1, "dog": 0}

    (tmp_path / "img" / "numbers.jsonl").write_text(
        "".join(f'{{"filename": "x{i}.{"jpg" if i == 1 else "png"}", "label": {label}}}\n'
                for i, label in [(1, 10), (3, 2), (4, 9)]).replace("x3.png", "sub/x3.png")
    )
    (tmp_path / "img" / "numbers_val.jsonl").write_text('{"filename": "x5.png", "label": 9}\n')
    numbered = listfile.load_list_splits(str(tmp_path / "img"), train_split="numbers.jsonl",
                                         val_split="numbers_val.jsonl", test_split="test")["train"]
    assert numbered.class_names == ("2", "9", "10")  # integer labels keep their numeric order


@pytest.mark.parametrize(
    "train_text, val_text, message",
    [
        ("name,label\nx1.png,a\n", None, "must name the columns filename,label"),
        ("filename,label\nx1.png,\n", None, "line 2: empty filename or label"),
        ("filename,label\nmissing.png,a\n", None, "1 files that do not exist.*missing.png"),
        ("filename,label\nx1.png,a\n", "filename,label\nx2.png,b\n", "classes \\['b'\\]"),
        ("filename,label\nx1.png,a\n", None, "val.csv: not found"),
    ],
)
def test_list_errors_name_the_file(tmp_path, train_text, val_text, message):
    _write_images(tmp_path, ["x1.png", "x2.png"])
    (tmp_path / "train.csv").write_text(train_text)
    if val_text:
        (tmp_path / "val.csv").write_text(val_text)
    with pytest.raises(sources.DataError, match=message) as info:
        listfile.load_list_splits(str(tmp_path), train_split="train.csv", val_split="val.csv", test_split="test.csv")
    assert str(tmp_path) in str(info.value)


def _data_config(**fields):
    config = base_config()
    config.data.update(fields)
    return config.data


def test_load_splits_reads_each_source_from_the_config(tmp_path):
    _make_split(tmp_path, "train", {"a": 4, "b": 4})
    folder = data.load_splits(_data_config(root=str(tmp_path), val_fraction=0.25, test_fraction=0.25))
    assert {s: len(folder[s]) for s in folder} == {"train": 4, "val": 2, "test": 2}
    (tmp_path / "all.csv").write_text("filename,label\n" + "".join(f"train/a/{i:03d}.png,a\n" for i in range(4)))
    listed = data.load_splits(_data_config(source="list", root=str(tmp_path), train_split="all.csv", val_fraction=0.5))
    assert len(listed["train"]) == 2 and len(listed["val"]) == 2
    with pytest.raises(sources.DataError, match="config.data.source='lmdb' is unknown"):
        data.load_splits(_data_config(source="lmdb"))
    with pytest.raises(sources.DataError, match="config.data.train_split='train' is not a list file"):
        data.load_splits(_data_config(source="list", root=str(tmp_path)))


def _tfds_config(data_dir: str, **fields):
    return _data_config(**{"source": "tfds", "tfds_name": "jaxclf_test_images", "root": data_dir, "val_split": "test", **fields})


def test_tfds_source_reads_a_data_set_by_name(tfds_data_dir):
    splits = data.load_splits(_tfds_config(tfds_data_dir))
    train = splits["train"]
    assert len(train) == 24 and len(splits["val"]) == 8 and train.class_names == ("cat", "dog", "fox")
    example = train[5]
    assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.uint8
    assert example["label"].dtype == np.int32
    assert train.class_counts() == {"cat": 12, "dog": 6, "fox": 6}  # tests/tfds_on_disk.py's labels
    assert repr(train) == "TfdsSource(jaxclf_test_images/1.0.0, split='train', 24 records)"
    in_worker = pickle.loads(pickle.dumps(train))  # as grain ships it to worker processes
    np.testing.assert_array_equal(in_worker[5]["image"], example["image"])
    np.testing.assert_array_equal(in_worker.labels, train.labels)
    with pytest.raises(sources.DataError, match="tfds_name"):
        data.load_splits(_data_config(source="tfds"))
    with pytest.raises(sources.DataError, match=r"train\[:90%\]"):
        data.load_splits(_tfds_config(tfds_data_dir, val_fraction=0.1))
    with pytest.raises(sources.DataError, match="tfds build no_such_set"):
        data.load_splits(_tfds_config(tfds_data_dir, tfds_name="no_such_set"))


def test_tfds_labels_are_read_without_decoding_images(tfds_data_dir, monkeypatch):
    import tensorflow_datasets as tfds

    train = data.load_splits(_tfds_config(tfds_data_dir))["train"]
    decoded = [int(train[i]["label"]) for i in range(len(train))]
    decode = tfds.features.Image.decode_example_np
    calls = []
    monkeypatch.setattr(tfds.features.Image, "decode_example_np", lambda *a, **k: calls.append(1) or decode(*a, **k))
    fresh = data.load_splits(_tfds_config(tfds_data_dir))["train"]
    assert fresh.labels.dtype == np.int32 and fresh.labels.tolist() == decoded
    assert calls == []  # decoding each image just for its label made start-up slow on big sets


def test_tfds_stream_resumes_exactly(tfds_data_dir):
    train = data.load_splits(_tfds_config(tfds_data_dir))["train"]
    make = lambda: iter(pipeline.make_train_loader(
        train, "decode|inception_crop(16)|flip_lr", global_batch_size=8, seed=1, num_workers=0))
    iterator = make()
    first = [next(iterator) for _ in range(2)]
    assert first[0]["image"].shape == (8, 16, 16, 3)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(4)]
    restored = make()
    restored.set_state(state)
    for got, want in zip([next(restored) for _ in range(4)], expected):
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])
    batches = list(pipeline.eval_batches(train, "decode|central_crop(16)", global_batch_size=8, num_workers=0))
    assert sum(b["mask"].sum() for b in batches) == 24


def test_training_on_a_tfds_set_resumes_to_the_same_parameters(tfds_data_dir, tmp_path):
    import jax
    import orbax.checkpoint as ocp

    from jaxclf import config as config_lib, train

    config = config_lib.load_config("tests/tiny_config.py", [
        "data.source=tfds", "data.tfds_name=jaxclf_test_images", f"data.root={tfds_data_dir}", "data.val_split=test",
        "batch_size=8", "total_steps=6"])
    devices = jax.devices()[:1]
    train.train_and_evaluate(config, str(tmp_path / "straight"), devices=devices)
    train.train_and_evaluate(config, str(tmp_path / "resumed"), devices=devices, stop_at_step=3)
    train.train_and_evaluate(config, str(tmp_path / "resumed"), devices=devices)
    restore = lambda d: ocp.StandardCheckpointer().restore(str(tmp_path / d / "checkpoints" / "6" / "state"))
    for a, b in zip(jax.tree.leaves(restore("straight")), jax.tree.leaves(restore("resumed"))):
        np.testing.assert_array_equal(a, b)
    with open(tmp_path / "straight" / "classes.json") as f:
        assert json.load(f)["class_names"] == ["cat", "dog", "fox"]
