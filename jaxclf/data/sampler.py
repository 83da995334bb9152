"""The training order: global batches that do not depend on how many processes read them.

grain's own IndexSampler shuffles each process's shard separately, so 1 process and 2 processes
see different batches. Here the order is fixed for the whole data set first (a fresh permutation
per epoch, from the seed), cut into global batches, and process p of P reads rows
[p * B/P, (p + 1) * B/P) of each. The global batch, and each example's augmentation randomness,
are therefore the same whether a run uses 1 process or 16, which makes multi-host runs
reproducible and comparable with single-host ones.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import sys

import grain
import numpy as np


@dataclasses.dataclass(frozen=True)
class GlobalBatchSampler:
    """A grain sampler over `num_records` examples in global batches of `global_batch_size`.

    Use with a DataLoader whose shard_options are this process's (index p of `process_count`):
    grain asks for indices p, p + P, p + 2P, ...; the k-th of them maps to row p * b + k % b of
    global batch k // b (b = B / P). Each epoch uses `num_records // global_batch_size` full
    batches. With `weights` (one per record), records are drawn with replacement in proportion
    to them instead (class-balanced sampling); an "epoch" is then `num_records` draws.
    """

    num_records: int
    global_batch_size: int
    process_count: int
    seed: int
    weights: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.weights is not None:
            weights = np.array(self.weights, np.float64)  # a copy: the caller may change theirs
            weights.flags.writeable = False
            if weights.shape != (self.num_records,) or (weights < 0).any() or not weights.sum() > 0:
                raise ValueError(f"weights must be {self.num_records} numbers >= 0, not all 0")
            object.__setattr__(self, "weights", weights)
        if self.global_batch_size % self.process_count:
            raise ValueError(
                f"batch_size={self.global_batch_size} must be a multiple of the {self.process_count} JAX processes"
            )
        if self.num_records < self.global_batch_size:
            raise ValueError(f"batch_size={self.global_batch_size} exceeds the {self.num_records} training examples")

    def __len__(self) -> int:
        return sys.maxsize  # endless; the trainer decides when to stop

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        position = self.global_position(index)
        return grain.RecordMetadata(
            index=index,
            record_key=self.record_at(position),
            rng=_stream(self.seed, position, _AUGMENTATION),
        )

    def global_position(self, index: int) -> int:
        """Position in the global stream of the `index` grain asks this process for."""
        return _global_position(index, self.global_batch_size, self.process_count)

    def record_at(self, position: int) -> int:
        if self.weights is not None:
            return int(np.searchsorted(self._cumulative_weights, self._draw(position), side="right"))
        per_epoch = self.num_records // self.global_batch_size * self.global_batch_size
        epoch, offset = divmod(position, per_epoch)
        # grain's MapDataset.range(num_records).shuffle(seed) at epoch * num_records + offset (its
        # permutation for each epoch), without its dataset wrappers (~11 us a record in the worker).
        return int(grain.experimental.index_shuffle(
            offset, max_index=self.num_records - 1, seed=(self.seed + epoch) % 2**32, rounds=4))

    @functools.cached_property
    def _cumulative_weights(self) -> np.ndarray:
        cumulative = np.cumsum(self.weights)
        return cumulative / cumulative[-1]

    def __repr__(self) -> str:
        # grain stores repr(sampler) in every iterator state and checks it on restore; the weights
        # (one per record) enter as a digest, so a state is small and a changed sampling is caught.
        weights = "None" if self.weights is None else hashlib.sha1(self.weights.tobytes()).hexdigest()[:16]
        return (
            f"GlobalBatchSampler(num_records={self.num_records}, global_batch_size={self.global_batch_size}, "
            f"process_count={self.process_count}, seed={self.seed}, weights={weights})"
        )

    def _draw(self, position: int) -> float:
        return _stream(self.seed, position, _SAMPLING).random()


def _global_position(index: int, global_batch_size: int, process_count: int) -> int:
    """The `index`-th record this process reads is row p * b + k % b of global batch k // b (b = B / P)."""
    process, k = index % process_count, index // process_count
    local_batch = global_batch_size // process_count
    return (k // local_batch) * global_batch_size + process * local_batch + k % local_batch


@dataclasses.dataclass(frozen=True)
class ReplaySampler:
    """Global batches whose last `replay_rows` rows come from a replay source (continual learning).

    Records 0..N-1 are the new data, N..N+M-1 the replay data (`combine.Concatenated`). Each global
    batch takes B - R rows from the new data's stream and R from the replay data's, each stream
    its own `GlobalBatchSampler` (epochs, permutations, optional weights for the new data), so the
    batches again depend only on the seed and the position: grain's position is the whole state,
    and a resumed run continues both streams exactly.
    """

    num_records: int
    replay_records: int
    global_batch_size: int
    replay_rows: int
    process_count: int
    seed: int
    weights: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if not 0 < self.replay_rows < self.global_batch_size:
            raise ValueError(f"replay rows {self.replay_rows} must be between 0 and the batch of {self.global_batch_size}")
        if self.global_batch_size % self.process_count:
            raise ValueError(
                f"batch_size={self.global_batch_size} must be a multiple of the {self.process_count} JAX processes"
            )

    @functools.cached_property
    def _new(self) -> GlobalBatchSampler:
        return GlobalBatchSampler(self.num_records, self.global_batch_size - self.replay_rows, 1, self.seed,
                                  self.weights)

    @functools.cached_property
    def _replay(self) -> GlobalBatchSampler:
        return GlobalBatchSampler(self.replay_records, self.replay_rows, 1, self.seed + 1)

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        position = _global_position(index, self.global_batch_size, self.process_count)
        batch, row = divmod(position, self.global_batch_size)
        new_rows = self.global_batch_size - self.replay_rows
        if row < new_rows:
            record = self._new.record_at(batch * new_rows + row)
        else:
            record = self.num_records + self._replay.record_at(batch * self.replay_rows + row - new_rows)
        return grain.RecordMetadata(index=index, record_key=record, rng=_stream(self.seed, position, _AUGMENTATION))

    def __repr__(self) -> str:
        return f"ReplaySampler({self.replay_records} replay records, {self.replay_rows} rows per batch, {self._new!r})"


_AUGMENTATION, _SAMPLING = 0, 1


def _stream(seed: int, position: int, purpose: int) -> np.random.Generator:
    """An independent random stream for each (seed, position in the global stream, purpose).

    Philox's 128-bit key holds the position and the seed side by side, so seed s+1 is not seed s
    shifted by one position (as with key=seed+position), and the sampling draw does not reuse the
    augmentation's numbers (as with a shifted counter).
    """
    return np.random.Generator(np.random.Philox(key=[position, (2 * seed + purpose) % 2**64]))
