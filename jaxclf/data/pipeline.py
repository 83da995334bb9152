"""grain loaders: an endless, checkpointable training stream and a padded single evaluation pass.

Each JAX process loads only its shard and its share of the global batch; decoding and
augmentation run in `num_workers` grain worker processes (0: in this process). Training batches
are `{"image": uint8[b, H, W, 3], "label": int32[b], "skipped": int32[b]}` with
b = global_batch_size // jax.process_count(); "skipped" counts unreadable images passed over
(see reader.py). A spec starts with `decode`, which runs as part of reading the record (together
with the crop, for `decode|inception_crop(...)|...`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterator

import grain
import jax
import numpy as np
from absl import flags

from jaxclf.data import imbalance, ops as ops_lib
from jaxclf.data.combine import Concatenated
from jaxclf.data.reader import DecodedSource, ReadWithCrop, RecordIndices
from jaxclf.data.sampler import GlobalBatchSampler, ReplaySampler


def resolve_num_workers(num_workers: int) -> int:
    """Worker processes to use: `num_workers` itself, or for -1 the usable cores minus one for the JAX process."""
    if num_workers == -1:
        # sched_getaffinity sees the cores a SLURM/cgroup job was given; cpu_count sees the whole node.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(cores - 1, 0)
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers}: use -1 (from the CPU count), 0 (in-process) or a positive count")
    return num_workers


def _make_loader(source, sampler, operations: list, *, num_workers: int, shard_options) -> grain.DataLoader:
    workers = resolve_num_workers(num_workers)
    if workers and not flags.FLAGS.is_parsed():
        # grain 0.2.18 reads an absl flag when it starts workers and fails unless absl has parsed
        # the command line (google/grain#1355, fixed later); jaxclf does not use absl.app.
        flags.FLAGS.mark_as_parsed()
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=operations,
        worker_count=workers,
        shard_options=shard_options,
        # Reading a record only looks up a path (decoding is an op), so grain's default 16 reader
        # threads buy nothing, and its 500-deep read-ahead buffer cost half the time per image.
        read_options=grain.ReadOptions(num_threads=0, prefetch_buffer_size=0),
    )


def close_iterator(iterator) -> None:
    """Stop a grain DataLoader iterator's worker processes now and unlink the batches they had ready in shared
    memory. Left to garbage collection at exit they stay linked, and Python's resource_tracker warns of
    "leaked shared_memory objects" (google/grain#1031). Safe to call twice; a no-op without workers."""
    # grain 0.2's DataLoaderIterator has no close(); the dataset iterator it wraps closes the whole chain.
    dataset_iterator = getattr(iterator, "_iterator", None)
    if dataset_iterator is not None:
        dataset_iterator.close()


def finish_shared_memory_unlinks() -> None:
    """Wait until every batch already freed in this process has been unlinked from shared memory.

    grain frees a worker's batch in a thread pool (SharedMemoryArray.enable_async_del); a program that
    exits right after freeing its last batches (a preempted or early-stopped run) would leave them to
    the resource_tracker's "leaked shared_memory" warning. Later frees unlink at once; the next loader
    that starts workers brings the pool back.
    """
    from grain._src.python.ipc.shared_memory_array import SharedMemoryArray  # no public handle on the pool

    pool = SharedMemoryArray._del_thread_pool
    if pool is not None:
        SharedMemoryArray._disable_async_del()
        pool.close()
        pool.join()


@contextlib.contextmanager
def closing_iterator(iterator) -> Iterator:
    """`iterator`, closed (close_iterator) when the block ends."""
    try:
        yield iterator
    finally:
        close_iterator(iterator)


def _local_batch_size(global_batch_size: int) -> int:
    """This process's share of `global_batch_size`; it must divide evenly over the JAX processes."""
    processes = jax.process_count()
    if global_batch_size <= 0 or global_batch_size % processes:
        raise ValueError(
            f"batch_size={global_batch_size} must be a positive multiple of the {processes} JAX processes"
        )
    return global_batch_size // processes


def make_train_loader(
    source,
    ops_spec: str,
    *,
    global_batch_size: int,
    seed: int,
    num_workers: int,
    sampling: str = "uniform",
    bad_images: str = "error",
    replay=None,
    replay_rows: int = 0,
    max_image_pixels: int = ops_lib.DEFAULT_MAX_IMAGE_PIXELS,
) -> grain.DataLoader:
    """An endless stream of this process's rows of each global batch, reshuffled each epoch from `seed`.

    The global batches are the same for any number of processes (see data/sampler.py).
    `sampling="balanced"` draws every class equally often (imbalance.py); `bad_images` is
    "error" or "skip" (reader.py). With a `replay` source (sharing `source`'s classes), the last
    `replay_rows` rows of every global batch are drawn from it (`sampler.ReplaySampler`). An image
    whose header declares more than `max_image_pixels` is unreadable (ops.TooManyPixels), never decoded.

    `iter(loader)` supports get_state()/set_state(); a restored iterator continues with the
    exact batches (and random crops) the original would have produced.
    """
    batch_size = _local_batch_size(global_batch_size)
    shard = grain.sharding.ShardByJaxProcess()
    weights = imbalance.sampling_weights(sampling, source)
    if replay is not None and replay_rows:
        sampler = ReplaySampler(len(source), len(replay), global_batch_size, replay_rows, jax.process_count(), seed,
                                weights)
        source = Concatenated((source, replay))
    else:
        sampler = GlobalBatchSampler(len(source), global_batch_size, jax.process_count(), seed, weights)
    decode, operations = _split_decode(ops_spec, max_image_pixels)
    reader = DecodedSource(source, decode, bad_images, mask_replaced=False)
    if decode.size is None and operations and isinstance(operations[0], ops_lib.InceptionCrop):
        # The crop's box decides how much of each JPEG to decode: the crop reads the records.
        reader, operations = RecordIndices(reader), [ReadWithCrop(reader, operations[0]), *operations[1:]]
    operations = [*operations, ToArray(), grain.transforms.Batch(batch_size, drop_remainder=True)]
    return _make_loader(reader, sampler, operations, num_workers=num_workers, shard_options=shard)


def _split_decode(ops_spec: str, max_image_pixels: int = ops_lib.DEFAULT_MAX_IMAGE_PIXELS,
                  ) -> tuple[ops_lib.Decode, list[ops_lib.Op]]:
    """The spec's leading `decode` op (run by the reader), refusing images over `max_image_pixels`, and the ops after it."""
    operations = ops_lib.parse_ops(ops_spec)
    if not isinstance(operations[0], ops_lib.Decode):
        raise ValueError(f"the op spec {ops_spec!r} must start with decode (e.g. 'decode|...')")
    return dataclasses.replace(operations[0], max_pixels=max_image_pixels), operations[1:]


def image_shape(ops_spec: str) -> tuple[int, int, int]:
    """The (H, W, 3) of the uint8 images `ops_spec` makes, from its ops run on a synthetic 1024x1024 image
    (for compiling a step before any data is read; every op that fixes a size fixes it for any input)."""
    example = {"image": np.zeros((1024, 1024, 3), np.uint8), "label": 0}
    rng = np.random.default_rng(0)
    for op in ops_lib.parse_ops(ops_spec):
        example = op.random_map(example, rng) if isinstance(op, grain.transforms.RandomMap) else op.map(example)
    return tuple(ToArray().map(example)["image"].shape)


@dataclasses.dataclass(frozen=True)
class ToArray(grain.transforms.Map):
    """The last op before batching: the image as a uint8[H, W, 3] array, whatever the ops left."""

    def map(self, example: dict) -> dict:
        return {**example, "image": np.asarray(example["image"])}


class EvalLoader:
    """Evaluation passes over this process's shard, in full batches, from one set of worker processes:
    {"image": uint8[b, H, W, 3], "label": int32[b], "mask": bool[b], "index": int64[b]}.

    `index` is each row's position in `source` (-1 for padding). Rows come in no fixed order:
    grain hands records to its workers round-robin and each worker batches its own. Every batch
    is full (b rows, so the eval step compiles once), and every process yields `num_batches`
    per pass, padded with mask=False rows, so collectives in the eval step line up even when
    shards differ in size. With bad_images="skip", an unreadable image's row is masked out too.

    The workers start once and serve every pass (starting them took ~1.5-2 s per evaluation).
    """

    def __init__(self, source, ops_spec: str, *, global_batch_size: int, num_workers: int, bad_images: str = "error",
                 max_image_pixels: int = ops_lib.DEFAULT_MAX_IMAGE_PIXELS):
        batch_size = _local_batch_size(global_batch_size)
        decode, operations = _split_decode(ops_spec, max_image_pixels)
        random_ops = [type(op).__name__ for op in operations if isinstance(op, grain.transforms.RandomMap)]
        if random_ops:
            raise ValueError(f"evaluation ops {ops_spec!r} include random ops {random_ops}; use deterministic ones")
        index, count = jax.process_index(), jax.process_count()
        batches = math.ceil(math.ceil(len(source) / count) / batch_size)  # of the largest shard
        # Each worker batches every workers-th record: pad to whole batches for every worker (and
        # use no more workers than batches, which would only add padding). Then each pass of the
        # endless record stream below is exactly `num_batches` batches.
        workers = min(resolve_num_workers(num_workers), batches)
        self.num_batches = math.ceil(batches / max(workers, 1)) * max(workers, 1)
        shard = _PaddedShard(
            source,
            start=index * len(source) // count,
            end=(index + 1) * len(source) // count,
            length=self.num_batches * batch_size,
        )
        reader = DecodedSource(shard, decode, bad_images, mask_replaced=True)
        sampler = grain.samplers.IndexSampler(num_records=len(shard), shuffle=False, num_epochs=None)
        operations = [*operations, ToArray(), grain.transforms.Batch(batch_size, drop_remainder=False)]
        no_sharding = grain.sharding.NoSharding()  # `shard` is this process's part already
        self._loader = _make_loader(reader, sampler, operations, num_workers=workers, shard_options=no_sharding)
        self._iterator = None

    def one_pass(self) -> Iterator[dict]:
        """The next pass: every example of the shard once, in `num_batches` batches."""
        if self._iterator is None:
            self._iterator = iter(self._loader)
        done = 0
        try:
            for done in range(1, self.num_batches + 1):
                yield next(self._iterator)
        finally:
            if done < self.num_batches:  # left part-way: the stream is out of step, start afresh
                self.close()

    def close(self) -> None:
        """Stop the workers (see close_iterator); a later pass starts new ones."""
        if self._iterator is not None:
            close_iterator(self._iterator)
            self._iterator = None


def eval_batches(
    source, ops_spec: str, *, global_batch_size: int, num_workers: int, bad_images: str = "error",
    max_image_pixels: int = ops_lib.DEFAULT_MAX_IMAGE_PIXELS,
) -> Iterator[dict]:
    """One evaluation pass (see EvalLoader), for a single evaluation."""
    loader = EvalLoader(source, ops_spec, global_batch_size=global_batch_size, num_workers=num_workers,
                        bad_images=bad_images, max_image_pixels=max_image_pixels)
    return _one_pass_then_close(loader)


def _one_pass_then_close(loader: EvalLoader) -> Iterator[dict]:
    try:
        yield from loader.one_pass()
    finally:
        loader.close()  # the workers end with the pass (a command such as evaluate exits right after)
        finish_shared_memory_unlinks()


@dataclasses.dataclass(frozen=True)
class _PaddedShard:
    """`source[start:end]` with mask=True and their indices, then copies of one example with
    mask=False (index -1) up to `length`."""

    source: object
    start: int
    end: int
    length: int

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if self.start + i < self.end:
            return {**self.source[self.start + i], "mask": True, "index": np.int64(self.start + i)}
        # `start` < len(source) even for an empty shard (fewer examples than processes).
        return {**self.source[self.start], "mask": False, "index": np.int64(-1)}
