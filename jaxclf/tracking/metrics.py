"""Metrics of a run: one JSON object per line in `workdir/metrics.jsonl` and TensorBoard event files
in `workdir` (`tensorboard --logdir DIR`; see tfevents.py), and the same scalars to the run's experiment
trackers (W&B, MLflow: jaxclf.tracking.trackers). The console shows a few (jaxclf.tracking.progress).

Only process 0 writes; every other process's writer does nothing, so callers need not check.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Protocol

import jax

from jaxclf.tracking.tfevents import EventWriter


class ScalarSink(Protocol):
    """Something else that gets every scalar record (an experiment tracker); it must not block."""

    def write(self, step: int, scalars: dict[str, float]) -> None: ...


class MetricsWriter:
    """Appends `{"step": ..., "<namespace>/<name>": value}` lines to `metrics.jsonl`, and the same
    scalars (tagged `<namespace>/<name>`) to a TensorBoard event file of its own and to `sinks`."""

    def __init__(self, workdir: str, sinks: Sequence[ScalarSink] = ()):
        self._active = jax.process_index() == 0
        self._path = os.path.join(workdir, "metrics.jsonl")
        self._events = EventWriter(workdir)
        self._sinks = list(sinks)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        """Record `scalars` at `step`."""
        if not self._active:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        with open(self._path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if k != "step"}
        self._events.add_scalars(step, scalars)
        for sink in self._sinks:
            sink.write(step, scalars)


def read_metrics(workdir: str) -> list[dict]:
    """All records of `workdir/metrics.jsonl`, in order."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
