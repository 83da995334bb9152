"""The global-batch sampler: the same global batches, and randomness, for any process count."""

import numpy as np
import pytest

from jaxclf.data.sampler import GlobalBatchSampler


def _global_stream(num_records, batch, processes, seed, steps, weights=None):
    """Reassemble global batches from what each process's grain loader would ask for."""
    samplers = [GlobalBatchSampler(num_records, batch, processes, seed, weights) for _ in range(processes)]
    local = batch // processes
    stream = []
    for step in range(steps):
        for p in range(processes):
            for k in range(step * local, (step + 1) * local):
                meta = samplers[p][p + k * processes]
                stream.append((meta.record_key, meta.rng.integers(1 << 30)))
    return stream


@pytest.mark.parametrize("processes", [2, 4])
def test_global_batches_and_rngs_do_not_depend_on_the_process_count(processes):
    assert _global_stream(50, 8, processes, 3, steps=20) == _global_stream(50, 8, 1, 3, steps=20)


def test_each_epoch_is_a_fresh_permutation_of_full_batches():
    keys = [key for key, _ in _global_stream(50, 8, 1, 0, steps=12)]
    epoch0, epoch1 = keys[:48], keys[48:96]  # 50 // 8 = 6 batches of 8 per epoch
    assert len(set(epoch0)) == 48 and len(set(epoch1)) == 48
    assert epoch0 != epoch1
    assert keys != [key for key, _ in _global_stream(50, 8, 1, 1, steps=12)]  # another seed


def test_weights_draw_in_proportion():
    weights = (1.0, 1.0, 0.0, 2.0)
    keys = [key for key, _ in _global_stream(4, 4, 2, 0, steps=1000, weights=weights)]
    counts = np.bincount(keys, minlength=4) / len(keys)
    np.testing.assert_allclose(counts, [0.25, 0.25, 0.0, 0.5], atol=0.02)


def test_batch_must_divide_over_processes():
    with pytest.raises(ValueError, match="batch_size=6 must be a multiple of the 4 JAX processes"):
        GlobalBatchSampler(50, 6, 4, 0)


def test_repr_is_short_and_changes_with_the_weights():
    # grain stores repr(sampler) in every iterator state and refuses a state whose repr differs.
    weights = np.ones(100_000)
    sampler = GlobalBatchSampler(100_000, 8, 1, 0, weights)
    assert len(repr(sampler)) < 200
    assert repr(sampler) == repr(GlobalBatchSampler(100_000, 8, 1, 0, weights.copy()))
    weights[5] = 2.0
    assert repr(sampler) != repr(GlobalBatchSampler(100_000, 8, 1, 0, weights))
    assert repr(sampler) != repr(GlobalBatchSampler(100_000, 8, 1, 0))
    with pytest.raises(ValueError, match="weights must be 4 numbers >= 0"):
        GlobalBatchSampler(4, 4, 1, 0, (1.0, -1.0, 1.0, 1.0))
