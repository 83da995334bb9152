"""The whole training loop on a JPEG folder against the same model's train step on device-resident data.

    .venv/bin/python bench/train_loop.py --models tiny_cnn,vit_tiny_patch16_224 --batch 16 \
        --out bench/results/train_loop_cpu.json

For each model, in one process: `step`, the jitted train step `jaxclf.train.build` makes, called
back to back on one batch already on the devices (the ceiling), then `loop`, `jaxclf.train.
train_and_evaluate` itself on the input bench's synthetic JPEG folder (decode|inception_crop(224)|
flip_lr in `--workers` grain processes, the default -1 being the cores minus one; batches copied
to the devices with prefetch; metrics logged every `--log_every` steps). The loop's rate is taken
over its log windows after the first (which holds the compilation); the fraction loop / step is
the figure of merit, a ratio within one run, so other jobs on a shared machine distort it less
than either rate. Where the gap goes, per step, timed inside the loop: waiting for the next host
batch from grain, the host-to-device copy (`sharding.shard_batch`), the data position kept for
checkpoints (`get_state`), and logging (TrainLog.flush less its wait for the device); plus the
CPU-seconds the worker processes spent per step (on a CPU they take cores from the step), and from
them the workers (cores) the input needs to match the step alone: where that exceeds the cores a
node has per accelerator, `decode(size)` on large photos or a pre-resized copy of the folder
(shorter side ~256-320) is the knob, not more workers.
`tiny_cnn` (registered here: one strided conv, a pool, a linear head) is so cheap that the loop
shows the input's ceiling; the ViT shows a model the input keeps up with.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from unittest import mock

import jax
import numpy as np
from flax import nnx

from input_pipeline import _descendants_cpu_seconds, load_average, write_jpeg_folder
from jaxclf import models, train
from jaxclf.evaluation import classification as eval_classification
from jaxclf.tasks import registry as task_registry
from jaxclf.training import loop as loop_lib, resolve as resolve_lib, sharding
from jaxclf.config import base_config
from jaxclf.data import pipeline
from jaxclf.tracking.metrics import read_metrics


class TinyCNN(models.Classifier):
    """A strided 8x8 conv to 16 channels, global pool, linear head: a step that costs next to nothing."""

    def __init__(self, num_classes: int, rngs: nnx.Rngs, dtype=None):
        self.conv = nnx.Conv(3, 16, (8, 8), strides=8, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(16, num_classes, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.conv(x)).mean(axis=(1, 2)))


if "tiny_cnn" not in models.list_models():
    models.register("tiny_cnn", TinyCNN)


def make_config(model: str, root: str, args: argparse.Namespace):
    config = base_config()
    config.model_name = model
    config.data.root = root
    config.data.num_workers = args.workers
    config.batch_size = args.batch
    config.total_steps = args.log_every * (1 + args.windows)  # the first window holds the compilation
    config.log_every_steps = args.log_every
    config.eval_every_epochs = 1e6  # evaluate (and checkpoint) only at the end, after the timed windows
    config.dtype = args.dtype
    config.optim.update(dict(name="sgd", lr=1e-3, schedule="constant"))
    return config


def time_step(config, steps: int) -> float:
    """Images per second of the train step alone, on one device-resident batch, after compiling it."""
    mesh = sharding.make_mesh()
    resolved = resolve_lib.resolve(config, mesh.devices.flat[0].platform, task_registry.check_config)
    with tempfile.TemporaryDirectory() as workdir:
        built = train.build(resolved.config, resolved.pretrained, workdir, mesh)
        try:
            iterator = built.make_train_iterator(0)  # one batch, decoded in this process
            batch = next(iterator)
            del iterator
            batch.pop("skipped")
            batch = sharding.shard_batch(batch, mesh)
            state, metrics = built.train_step(built.state, batch)
            jax.block_until_ready(metrics)
            start = time.perf_counter()
            for _ in range(steps):
                state, metrics = built.train_step(state, batch)
            jax.block_until_ready((state, metrics))
            return steps * config.batch_size / (time.perf_counter() - start)
        finally:
            built.checkpointer.close()


class LoopProbe:
    """Times the training loop's parts from outside (patched wrappers), keeping events with their times."""

    def __init__(self):
        self.events: list[tuple[str, float, float]] = []  # (name, start, seconds)
        self.flushes: list[tuple[int, float]] = []  # (step, end time) of flushes that wrote a window
        self.worker_cpu: dict[int, float] = {}  # step -> descendants' CPU seconds then
        self.main_cpu: dict[int, float] = {}
        self._in_flush = self._in_eval = False

    def _timed(self, name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.events.append((name, start, time.perf_counter() - start))

    @contextlib.contextmanager
    def patched(self):
        real_loader, real_shard = pipeline.make_train_loader, sharding.shard_batch
        real_flush, real_device_get = loop_lib.TrainLog.flush, jax.device_get
        real_evaluate = eval_classification.Classification.evaluate
        probe = self

        class TimedIterator:
            def __init__(self, iterator):
                self._iterator = iterator

            def __iter__(self):
                return self

            def __next__(self):
                return probe._timed("input wait", next, self._iterator)

            def get_state(self):
                return probe._timed("data position (get_state)", self._iterator.get_state)

            def set_state(self, state):
                return self._iterator.set_state(state)

        class TimedLoader:
            def __init__(self, loader):
                self._loader = loader

            def __iter__(self):
                return TimedIterator(iter(self._loader))

        def shard_batch(batch, mesh):
            if probe._in_eval:
                return real_shard(batch, mesh)
            return probe._timed("host-to-device copy", real_shard, batch, mesh)

        def device_get(tree):
            if not probe._in_flush:
                return real_device_get(tree)
            return probe._timed("device wait (at log steps)", real_device_get, tree)

        def flush(log, step):
            if probe._in_eval or not log._pending:
                return real_flush(log, step)
            probe._in_flush = True
            try:
                probe._timed("flush", real_flush, log, step)
            finally:
                probe._in_flush = False
            probe.flushes.append((step, time.perf_counter()))
            probe.worker_cpu[step], probe.main_cpu[step] = _descendants_cpu_seconds(), time.process_time()

        def evaluate(*args, **kwargs):
            probe._in_eval = True
            try:
                return real_evaluate(*args, **kwargs)
            finally:
                probe._in_eval = False

        with mock.patch.object(pipeline, "make_train_loader", lambda *a, **k: TimedLoader(real_loader(*a, **k))), \
                mock.patch.object(sharding, "shard_batch", shard_batch), \
                mock.patch.object(jax, "device_get", device_get), \
                mock.patch.object(loop_lib.TrainLog, "flush", flush), \
                mock.patch.object(eval_classification.Classification, "evaluate", evaluate):
            yield self

    def steady_state(self, batch: int) -> dict:
        """Rates and per-step milliseconds over the log windows after the first."""
        (first_step, start), (last_step, end) = self.flushes[0], self.flushes[-1]
        steps = last_step - first_step
        inside = {}
        for name, t, seconds in self.events:
            if start <= t < end:
                inside[name] = inside.get(name, 0.0) + seconds
        ms = {name: seconds / steps * 1e3 for name, seconds in inside.items()}
        ms["logging (flush less its device wait)"] = ms.pop("flush", 0.0) - ms.get("device wait (at log steps)", 0.0)
        return {
            "steps": steps,
            "images_per_sec": steps * batch / (end - start),
            "ms_per_step": (end - start) / steps * 1e3,
            "parts_ms_per_step": ms,
            "worker_cpu_s_per_step": (self.worker_cpu[last_step] - self.worker_cpu[first_step]) / steps,
            "main_cpu_s_per_step": (self.main_cpu[last_step] - self.main_cpu[first_step]) / steps,
        }


def time_loop(config, workdir: str) -> dict:
    with LoopProbe().patched() as probe:
        train.train_and_evaluate(config, workdir)
    result = probe.steady_state(config.batch_size)
    logged = [r["train/images_per_sec"] for r in read_metrics(workdir) if "train/images_per_sec" in r]
    result["logged_images_per_sec"] = logged  # the loop's own numbers, window by window (the first compiles)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny_cnn,vit_tiny_patch16_224")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--log_every", type=int, default=5, help="steps per log window")
    parser.add_argument("--windows", type=int, default=3, help="timed log windows (after the compiling one)")
    parser.add_argument("--workers", type=int, default=-1, help="grain workers; -1 (the default): the cores minus one")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (bfloat16 on GPUs)")
    parser.add_argument("--images", type=int, default=800, help="training images in the generated folder")
    parser.add_argument("--root", default="", help="reuse this folder (train/ and val/) instead of a temporary one")
    parser.add_argument("--out", default="bench/results/train_loop_cpu.json")
    args = parser.parse_args(argv)

    root = args.root or tempfile.mkdtemp(prefix="jaxclf-train-loop-")
    if not os.path.isdir(os.path.join(root, "train")):
        write_jpeg_folder(root, args.images)
    if not os.path.isdir(os.path.join(root, "val")):
        write_jpeg_folder(root, 40, seed=1, split="val")
    workers = pipeline.resolve_num_workers(args.workers)
    results, loads = {}, [load_average()]
    for model in args.models.split(","):
        config = make_config(model, root, args)
        step_rate = time_step(config, args.log_every * args.windows)
        with tempfile.TemporaryDirectory() as workdir:
            loop = time_loop(config, workdir)
        loads.append(load_average())
        input_capacity = workers * args.batch / loop["worker_cpu_s_per_step"] if loop["worker_cpu_s_per_step"] else 0
        # Worker CPU-seconds per image times the step's images per second: the cores the input needs to keep up.
        workers_needed = math.ceil(step_rate * loop["worker_cpu_s_per_step"] / args.batch)
        results[model] = {"step_images_per_sec": step_rate, "loop": loop, "fraction": loop["images_per_sec"] / step_rate,
                          "input_images_per_sec_if_each_worker_had_a_core": input_capacity,
                          "workers_needed_for_the_step_rate": workers_needed}

    print(f"\n{jax.device_count()} {jax.default_backend()} device(s), batch {args.batch}, {workers} grain worker(s), "
          f"{args.windows} windows of {args.log_every} steps; load average (1, 5, 15 min): {' | '.join(loads)}")
    print("| model | step alone img/s | loop img/s | loop / step | ms/step step alone | ms/step loop | "
          "input wait | host-to-device | get_state | logging | device wait at logs | worker CPU-s/step "
          "| input img/s if each worker had a core | workers needed |")
    print("| --- " * 14 + "|")
    for model, r in results.items():
        loop, parts = r["loop"], r["loop"]["parts_ms_per_step"]
        print(f"| {model} | {r['step_images_per_sec']:.1f} | {loop['images_per_sec']:.1f} | {r['fraction']:.1%} "
              f"| {args.batch / r['step_images_per_sec'] * 1e3:.1f} | {loop['ms_per_step']:.1f} "
              f"| {parts.get('input wait', 0):.1f} | {parts.get('host-to-device copy', 0):.1f} "
              f"| {parts.get('data position (get_state)', 0):.2f} | {parts['logging (flush less its device wait)']:.2f} "
              f"| {parts.get('device wait (at log steps)', 0):.1f} | {loop['worker_cpu_s_per_step']:.3f} "
              f"| {r['input_images_per_sec_if_each_worker_had_a_core']:.0f} | {r['workers_needed_for_the_step_rate']} |")
    record = {
        "settings": vars(args), "workers": workers, "backend": jax.default_backend(), "devices": jax.device_count(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average": loads},
        "results": results,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
