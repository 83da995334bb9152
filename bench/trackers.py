"""What experiment trackers cost the training loop: the time of one metrics write, as `TrainLog.flush`
makes it, with and without trackers.

    .venv/bin/python bench/trackers.py --writes 500 --out bench/results/trackers_cpu.json

Times `MetricsWriter.write` of 9 scalars (a train window's 8 and an evaluation's accuracy) into a temporary
workdir, `--writes` times, for:
  none      metrics.jsonl and TensorBoard only (jaxclf without trackers);
  offline   also W&B (offline) and MLflow (a local file store), the real libraries in their threads;
  stuck     also a tracker whose every call hangs (a network that never answers): the queue fills and drops.
Also the time `close` takes at the end (the trackers sending what they hold). W&B and MLflow run with no
network (offline mode, a file store, telemetry off). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time

import ml_collections

from jaxclf.config import base_config
from jaxclf.tracking import trackers
from jaxclf.tracking.metrics import MetricsWriter

SCALARS = {"train/loss": 2.3, "train/accuracy": 0.1, "train/grad_norm": 0.5, "train/lr": 0.1,
           "train/images_per_sec": 900.0, "train/skipped_steps": 0, "data/skipped_images": 0, "epoch": 1.5,
           "val/accuracy": 0.5}


class StuckTracker:
    """Every call hangs (its daemon thread ends with the process): a tracker whose server never answers."""

    def open(self, run_id):
        return "stuck"

    def __getattr__(self, method):
        return lambda *args: threading.Event().wait()


def make(options, run_name, workdir):  # the module interface of trackers.TRACKERS
    return StuckTracker()


def time_writes(kind: str, writes: int, queue_size: int) -> dict:
    """Microseconds per write (median of 10 slices) and the seconds `close` took, for one kind of run."""
    with tempfile.TemporaryDirectory() as workdir:
        config = base_config()
        config.tracking.queue_size = queue_size
        config.tracking.finish_timeout_s = 60.0 if kind == "offline" else 0.0
        config.tracking.mlflow.tracking_uri = f"file://{workdir}/mlruns"
        config.tracking.wandb.mode = "offline"
        if kind == "offline":
            config.trackers = ("wandb", "mlflow")
        elif kind == "stuck":
            trackers.TRACKERS["stuck"] = (__name__, "json", "stuck")
            config.trackers = ("stuck",)
            with config.tracking.unlocked():
                config.tracking.stuck = ml_collections.ConfigDict()
        tracked = trackers.start(config, workdir, params=config.to_dict())
        writer = MetricsWriter(workdir, sinks=[tracked])
        slices, per_slice = [], max(1, writes // 10)
        for start in range(0, writes, per_slice):
            began = time.perf_counter()
            for step in range(start + 1, start + per_slice + 1):
                writer.write(step, SCALARS)
            slices.append((time.perf_counter() - began) / per_slice)
        began = time.perf_counter()
        tracked.close()
        close_s = time.perf_counter() - began
        dropped = sum(worker.dropped for worker in tracked._workers)
    return {"us_per_write": statistics.median(slices) * 1e6, "close_s": close_s, "dropped": dropped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=500)
    parser.add_argument("--queue_size", type=int, default=1000, help="config.tracking.queue_size")
    parser.add_argument("--out", default="bench/results/trackers_cpu.json")
    args = parser.parse_args()
    os.environ.update(MLFLOW_ALLOW_FILE_STORE="true", MLFLOW_DISABLE_TELEMETRY="true", WANDB_ERROR_REPORTING="false",
                      WANDB_SILENT="true")
    with tempfile.TemporaryDirectory() as home:
        for kind in ("CACHE", "DATA", "CONFIG"):
            os.environ[f"WANDB_{kind}_DIR"] = os.path.join(home, kind.lower())
        results = {kind: time_writes(kind, args.writes, args.queue_size) for kind in ("none", "offline", "stuck")}
    print(f"{args.writes} writes of {len(SCALARS)} scalars, queue_size {args.queue_size} (taken under load: "
          f"load average {os.getloadavg()[0]:.1f})", file=sys.stderr)
    print(f"{'trackers':<9} {'us/write':>9} {'over none':>10} {'close s':>8} {'dropped':>8}")
    for kind, row in results.items():
        print(f"{kind:<9} {row['us_per_write']:>9.1f} {row['us_per_write'] - results['none']['us_per_write']:>10.1f} "
              f"{row['close_s']:>8.2f} {row['dropped']:>8}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"settings": vars(args), "loadavg": os.getloadavg(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
