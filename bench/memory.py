"""Remat (config.model.remat) against none: the train step's temporary memory, and its step-time cost.

    PYTHONPATH=$PWD .venv/bin/python bench/memory.py --out bench/results/memory_cpu.json
    python bench/memory.py --time_batch 64 --time_size 224 --out bench/results/memory_gpu.json   # on a GPU

Memory part: for each model and policy, `python -m jaxclf.train --dry_run`'s own measurement
(`train.dry_run`) of the train step at `--batch` (default 64) and 224 px, AdamW, one device, in the
compute dtype config.dtype="auto" gives (float32 on CPU, bfloat16 on GPU): XLA's
temporaries (activations kept for the backward pass and every scratch buffer) and the whole peak, from the
compiled program's memory analysis; nothing runs. The data is a folder of digits (only its class list is
read). Time part: the same steps built for real at `--time_batch` and `--time_size` (on a 2-core CPU a small
batch and resolution, so a step takes about a second) and timed in alternating rounds; reported: median
step time and its ratio to no remat (the recomputation's cost).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

from jaxclf import config as config_lib, models, train
from jaxclf.data import digits
from jaxclf.training import memory, optim, sharding, steps as steps_lib

POLICIES = ("", "dots_saveable", "nothing_saveable")


def step_config(root: str, model_name: str, policy: str, batch: int, size: int) -> config_lib.ml_collections.ConfigDict:
    """A run's config for `model_name` with remat `policy` at `batch` x `size` px, AdamW, on the digits at `root`."""
    config = config_lib.base_config()
    config.model_name = model_name
    config.model.remat = policy
    if model_name.startswith("vit_"):
        config.model.img_size = size
    config.data.root = root
    config.data.pp_train = f"decode|resize({size})"
    config.batch_size = batch
    config.optim.update(dict(name="adamw", lr=1e-3))
    return config


def compute_dtype() -> str:
    """What config.dtype "auto" gives on this platform (as `train.dry_run` resolves it)."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def measure_memory(root: str, model_name: str, policy: str, batch: int, size: int) -> dict:
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        step, _ = train.dry_run(step_config(root, model_name, policy, batch, size), devices=jax.devices()[:1])
    return {"temporaries_bytes": step.temporaries, "total_bytes": step.total, "params_bytes": step.params,
            "optimizer_bytes": step.optimizer, "flops": step.flops, "compile_s": time.perf_counter() - started}


def build_step(model_name: str, policy: str, batch: int, size: int):
    """A real train state and jitted step (one device) for `model_name` with remat `policy`, and a batch."""
    options = {"img_size": size} if model_name.startswith("vit_") else {}
    model = models.create(model_name, num_classes=10, remat=policy, dtype=models.DTYPES[compute_dtype()], **options)
    config = step_config("", model_name, policy, batch, size)
    config.data.mean, config.data.std = (0.5,) * 3, (0.5,) * 3
    tx, _ = optim.make_optimizer(config.optim, model, total_steps=1000, steps_per_epoch=100)
    graphdef, _, state = steps_lib.create_train_state(model, tx)
    mesh = sharding.make_mesh(jax.devices()[:1])
    state_sharding = sharding.state_sharding(state, mesh, "replicate")
    step = steps_lib.make_train_step(graphdef, tx, mesh, config, 10, state_sharding, steps_lib.cross_entropy_loss(),
                                     compiler_options=steps_lib.train_compiler_options(model))
    rng = np.random.default_rng(0)
    batch_arrays = sharding.shard_batch({"image": rng.integers(0, 256, (batch, size, size, 3), np.uint8),
                                         "label": rng.integers(0, 10, batch).astype(np.int32)}, mesh)
    return step, jax.device_put(state, state_sharding), batch_arrays


def time_steps(model_name: str, batch: int, size: int, steps: int, rounds: int) -> dict[str, float]:
    """Median seconds per step for each policy, rounds alternating between them."""
    built = {policy: build_step(model_name, policy, batch, size) for policy in POLICIES}
    states = {}
    for policy, (step, state, batch_arrays) in built.items():  # compile and warm up
        state, metrics = step(state, batch_arrays)
        jax.block_until_ready(metrics)
        states[policy] = state
    times = {policy: [] for policy in POLICIES}
    for _ in range(rounds):
        for policy, (step, _, batch_arrays) in built.items():
            state = states[policy]
            for _ in range(steps):
                started = time.perf_counter()
                state, metrics = step(state, batch_arrays)
                jax.block_until_ready(metrics)
                times[policy].append(time.perf_counter() - started)
            states[policy] = state
    return {policy: statistics.median(values) for policy, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=64, help="batch of the memory part (compile only)")
    parser.add_argument("--size", type=int, default=224, help="image size of the memory part")
    parser.add_argument("--time_batch", type=int, default=8, help="batch of the timed steps (0: no timing)")
    parser.add_argument("--time_size", type=int, default=112, help="image size of the timed steps")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round and policy")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="bench/results/memory_cpu.json")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = digits.write_digits_folder(os.path.join(tmp, "digits"), image_size=16)
        for model_name in args.models.split(","):
            timed = time_steps(model_name, args.time_batch, args.time_size, args.steps, args.rounds) if args.time_batch else {}
            for policy in POLICIES:
                row = {"model": model_name, "remat": policy or "none",
                       **measure_memory(root, model_name, policy, args.batch, args.size)}
                if timed:
                    row["step_s"] = timed[policy]
                rows.append(row)
                print(f"{model_name} remat={policy or 'none'}: {row['temporaries_bytes'] / memory.GIB:.2f} GiB of "
                      f"temporaries", file=sys.stderr, flush=True)
    for row in rows:
        base = next(r for r in rows if r["model"] == row["model"] and r["remat"] == "none")
        row["temporaries_reduction"] = 1 - row["temporaries_bytes"] / base["temporaries_bytes"]
        row["total_reduction"] = 1 - row["total_bytes"] / base["total_bytes"]
        if "step_s" in row:
            row["step_time_ratio"] = row["step_s"] / base["step_s"]
    print(f"\ntrain step at batch {args.batch}, {args.size} px, {compute_dtype()}, AdamW, one {jax.devices()[0].device_kind} "
          f"(compiled memory analysis); step time at batch {args.time_batch}, {args.time_size} px")
    print(f"{'model':<24} {'remat':<18} {'temps GiB':>9} {'less':>6} {'peak GiB':>9} {'less':>6} {'step s':>8} {'x none':>7}")
    for r in rows:
        timing = f"{r['step_s']:>8.3f} {r['step_time_ratio']:>7.2f}" if "step_s" in r else ""
        print(f"{r['model']:<24} {r['remat']:<18} {r['temporaries_bytes'] / memory.GIB:>9.2f} "
              f"{r['temporaries_reduction']:>6.0%} {r['total_bytes'] / memory.GIB:>9.2f} {r['total_reduction']:>6.0%} {timing}")
    record = {"args": vars(args), "device": jax.devices()[0].device_kind, "dtype": compute_dtype(), "jax": jax.__version__,
              "loadavg": os.getloadavg(), "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
