"""Per-step host overhead of the training loop, with a model so small that the step itself is ~free.

    .venv/bin/python bench/host_overhead.py --steps 2000 --out bench/results/host_overhead_cpu.json

Times three loops over the same jitted train step of a one-layer model on 8x8 images:
  bare      the step called back to back on one device-resident batch (the floor);
  loop      what `jaxclf.train` does each step besides the step itself: host batch -> mesh copy
            with prefetch (`loop.prefetch_to_mesh`), per-step metrics kept on the device (`TrainLog`),
            a stop-signal check, and a log line (the loop's one host sync) every `--log_every`;
  sync      the same, but reading the loss back every step (what the loop avoids).
The difference loop - bare is jaxclf's per-step host overhead; sync shows what a host sync per step
would cost. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from jaxclf.training import loop, optim, preemption, sharding, steps
from jaxclf import models
from jaxclf.config import base_config
from jaxclf.tracking.metrics import MetricsWriter


class Linear(models.Classifier):
    def __init__(self, rngs: nnx.Rngs):
        self.head = nnx.Linear(8 * 8 * 3, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(x.reshape(x.shape[0], -1))


class InMemoryIterator:
    """Host batches as grain yields them (uint8 images, labels, skipped flags), with a state."""

    def __init__(self, batch: int):
        rng = np.random.default_rng(0)
        self._batch = {"image": rng.integers(0, 256, (batch, 8, 8, 3), dtype=np.uint8),
                       "label": rng.integers(0, 10, batch).astype(np.int32)}
        self._position = 0

    def __next__(self) -> dict:
        self._position += 1
        return {**self._batch, "skipped": np.zeros(len(self._batch["label"]), bool)}

    def get_state(self) -> bytes:
        return str(self._position).encode()


def build(batch: int):
    config = base_config()
    config.data.mean, config.data.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    config.optim.update(dict(name="sgd", lr=0.01, schedule="constant"))
    mesh = sharding.make_mesh(jax.devices())
    model = Linear(nnx.Rngs(0))
    tx, schedule = optim.make_optimizer(config.optim, model, 10**6, 1000)
    graphdef, _, state = steps.create_train_state(model, tx)
    state_sharding = sharding.state_sharding(state, mesh, "replicate")
    state = jax.device_put(state, state_sharding)
    step = steps.make_train_step(graphdef, tx, mesh, config, 10, state_sharding, steps.cross_entropy_loss())
    return config, mesh, schedule, state, step


def time_bare(state, step, batch, n: int) -> tuple[object, float]:
    """(state, seconds per step); the state is donated to each step, so the caller continues with ours."""
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(n):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return state, (time.perf_counter() - start) / n


def time_loop(state, step, mesh, schedule, batch: int, n: int, log_every: int, sync_every_step: bool):
    """(state, seconds per step) of the training loop's per-step work around `step`."""
    with tempfile.TemporaryDirectory() as workdir, open(os.devnull, "w") as devnull, \
            contextlib.redirect_stderr(devnull):  # the log lines themselves are not the point here
        log = loop.TrainLog(MetricsWriter(workdir), schedule, batch, 1000, "stop", 0, {})
        batches = loop.prefetch_to_mesh(InMemoryIterator(batch), mesh)
        with preemption.StopSignals() as signals:
            start = time.perf_counter()
            for i in range(1, n + 1):
                batch_on_mesh, _, skipped = next(batches)
                state, metrics = step(state, batch_on_mesh)
                log.add({**metrics, "skipped_images": skipped})
                if sync_every_step:
                    float(metrics["loss"])
                log_now = i % log_every == 0
                signals.should_stop(at_sync_point=log_now)
                if log_now:
                    log.flush(i)
            jax.block_until_ready(state)
            elapsed = time.perf_counter() - start
    return state, elapsed / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--log_every", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench/results/host_overhead_cpu.json")
    args = parser.parse_args()

    _, mesh, schedule, state, step = build(args.batch)
    host_batch = next(InMemoryIterator(args.batch))
    host_batch.pop("skipped")
    device_batch = sharding.shard_batch(host_batch, mesh)
    rounds = {"bare": [], "loop": [], "sync": []}
    for _ in range(args.rounds):
        state, seconds = time_bare(state, step, device_batch, args.steps)
        rounds["bare"].append(seconds)
        for name, sync in (("loop", False), ("sync", True)):
            state, seconds = time_loop(state, step, mesh, schedule, args.batch, args.steps, args.log_every, sync)
            rounds[name].append(seconds)
    us = {name: statistics.median(times) * 1e6 for name, times in rounds.items()}
    print(f"{jax.device_count()} {jax.default_backend()} device(s), batch {args.batch}, {args.steps} steps x {args.rounds} rounds")
    print(f"{'loop':<6} {'us/step':>9} {'over bare':>10}")
    for name, value in us.items():
        print(f"{name:<6} {value:>9.1f} {value - us['bare']:>10.1f}")
    result = {"settings": vars(args), "backend": jax.default_backend(), "devices": jax.device_count(),
              "us_per_step": us, "rounds_s": rounds, "overhead_us": us["loop"] - us["bare"]}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
