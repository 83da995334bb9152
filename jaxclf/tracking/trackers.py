"""Experiment trackers (`config.trackers`: W&B, MLflow) beside metrics.jsonl and TensorBoard.

Each tracker runs in a background thread of its own, fed through a bounded queue: the training loop
only enqueues scalars it already holds on the host, never waits for a tracker and never syncs with the
device for one. A full queue drops the call and counts it; a tracker that fails (network down) warns
once and the run goes on. Only process 0 tracks.

`workdir/trackers.json` keeps each tracker's run id and, per metric, the last step it logged: a
resumed run (or `jaxclf.evaluate` of a finished one) continues the same tracked run and does not log
again the steps the checkpoint made it repeat.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import queue
import threading
import warnings
from collections.abc import Mapping, Sequence
from typing import Protocol

import jax
import ml_collections

from jaxclf import config as config_lib
from jaxclf.tracking import progress

STATE_FILE = "trackers.json"
# name -> (module defining `make(options, run_name, workdir) -> Tracker`, the library it imports,
#          the extra installing it)
TRACKERS = {
    "wandb": ("jaxclf.tracking.wandb_tracker", "wandb", "wandb"),
    "mlflow": ("jaxclf.tracking.mlflow_tracker", "mlflow", "mlflow"),
}
FINISHED, KILLED, FAILED = "finished", "killed", "failed"  # how a tracked run ends (close's status)


class TrackerWarning(RuntimeWarning):
    """A tracker failed or fell behind; the run goes on without what it could not send."""


class Tracker(Protocol):
    """One experiment tracker, called from its own thread only, in this order: `open` once, then the
    logging calls, then `close`."""

    def open(self, run_id: str | None) -> str:
        """Start a tracked run, or continue the one with `run_id`; return the run's id."""

    def log_params(self, params: dict[str, str]) -> None: ...

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None: ...

    def log_summary(self, step: int, summary: dict[str, float | str]) -> None:
        """The run's outcome (result.json, evaluate's report), shown as final values rather than curves."""

    def log_files(self, paths: Sequence[str], folder: str) -> None:
        """Upload files as artefacts of the run, under `folder` ("" for the top)."""

    def close(self, status: str) -> None:
        """End the tracked run: FINISHED, KILLED (stopped, will be resumed) or FAILED."""


def check(config: ml_collections.ConfigDict) -> None:
    """Fail now, naming config.trackers, for an unknown tracker or one whose library is not installed."""
    for name in config.trackers:
        if name not in TRACKERS:
            raise config_lib.ConfigError(f"config.trackers names {name!r}; known trackers: {', '.join(TRACKERS)}")
        library, extra = TRACKERS[name][1:]
        if importlib.util.find_spec(library) is None:
            raise config_lib.ConfigError(
                f"config.trackers names {name!r} but the {library} package is not installed: "
                f"pip install 'jaxclf[{extra}]'")


def start(config: ml_collections.ConfigDict, workdir: str, params: Mapping | None = None) -> TrackedRun:
    """Open (or continue) the run's tracked runs in the background; log `params` (the resolved config)
    when a tracked run is new. Nothing is tracked on processes other than 0."""
    check(config)
    names = config.trackers if jax.process_index() == 0 else ()
    run_name = config.tracking.run_name or os.path.basename(os.path.abspath(workdir))
    state = _StateFile(os.path.join(workdir, STATE_FILE))
    workers = []
    for name in names:
        module = importlib.import_module(TRACKERS[name][0])  # our thin module; it imports the library in the worker
        tracker = module.make(config.tracking[name], run_name, workdir)
        workers.append(_Worker(name, tracker, state, config.tracking.queue_size,
                               flatten(params or {}, ".")))
    return TrackedRun(workers, config.tracking.finish_timeout_s)


class TrackedRun:
    """The run's trackers as one object: `write` is a MetricsWriter sink; `log_summary` and `log_files`
    report the outcome; `close` waits (at most finish_timeout_s) for each tracker to send what it holds."""

    def __init__(self, workers: Sequence[_Worker], finish_timeout_s: float):
        self._workers, self._timeout = list(workers), finish_timeout_s
        self._outcome_logged = False

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Enqueue `scalars` (host floats, as metrics.jsonl gets them) at `step`; never blocks."""
        for worker in self._workers:
            worker.submit("log_scalars", int(step), {k: float(v) for k, v in scalars.items()})

    def log_summary(self, step: int, summary: Mapping, files: Sequence[tuple[str, str]] = ()) -> None:
        """The run's outcome (e.g. {"result": result.json's record}, flattened with "/") and its files
        [(path, folder)]; a tracked run that got one ends as finished."""
        self._outcome_logged = True
        flat = flatten(summary, "/")
        for worker in self._workers:
            worker.submit("log_summary", int(step), flat)
        self.log_files(files)

    def log_files(self, files: Sequence[tuple[str, str]]) -> None:
        """Upload [(path, folder)] as artefacts; files that do not exist are left out."""
        by_folder: dict[str, list[str]] = {}
        for path, folder in files:
            if os.path.isfile(path):
                by_folder.setdefault(folder, []).append(path)
        for folder, paths in by_folder.items():
            for worker in self._workers:
                worker.submit("log_files", paths, folder)

    def close(self, error: BaseException | None = None, *, interrupted: bool = False) -> None:
        """End the tracked runs: failed on `error` (unless `interrupted`: a stop signal), else finished
        once a summary was logged, else killed (stopped early, to be resumed)."""
        status = FAILED if error is not None and not interrupted else FINISHED if self._outcome_logged else KILLED
        for worker in self._workers:
            worker.submit("close", status, force=True)
        for worker in self._workers:
            worker.join(self._timeout)

    def __enter__(self) -> TrackedRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exc)


class _Worker:
    """A tracker's thread: opens the tracked run, then makes the queued calls in order. A full queue drops
    calls; a failing call is counted. The first of these warns, once; the counts are shown at the end."""

    def __init__(self, name: str, tracker: Tracker, state: _StateFile, queue_size: int, params: dict[str, str]):
        self.name, self._tracker, self._state = name, tracker, state
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._params = params
        self.dropped = self.failed = 0
        self._warned = False
        self._thread = threading.Thread(target=self._run, name=f"jaxclf-tracker-{name}", daemon=True)
        self._thread.start()

    def submit(self, method: str, *args, force: bool = False) -> None:
        """Enqueue a call without waiting; `force` (close) waits for room, as the run is ending anyway."""
        try:
            if force:
                self._queue.put((method, args), timeout=1.0)
            else:
                self._queue.put_nowait((method, args))
        except queue.Full:
            self.dropped += 1  # warned about from the tracker's thread, which also warns of failures, once in all

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        left = self._queue.qsize()
        if self._thread.is_alive():
            self._warn(f"still sending after {timeout:g}s (config.tracking.finish_timeout_s); "
                       f"{left} calls left unsent")
        if self.dropped or self.failed:
            progress.say(f"tracker {self.name}: {self.dropped} calls dropped, {self.failed} failed in this run")

    def _run(self) -> None:
        saved = self._state.get(self.name)
        try:
            run_id = self._tracker.open(saved.get("run_id"))
        except Exception as e:  # noqa: BLE001 - a tracker never stops training
            self._warn_once(f"could not start ({type(e).__name__}: {e}); the run goes on without it")
            return self._drain()
        last_steps = dict(saved.get("last_steps", {})) if run_id == saved.get("run_id") else {}
        if run_id != saved.get("run_id"):
            self._call("log_params", self._params)
            self._save(run_id, last_steps)
        while True:
            method, args = self._queue.get()
            if self.dropped:
                self._warn_once(f"it falls behind; calls are dropped (more than config.tracking.queue_size="
                                f"{self._queue.maxsize} waiting)")
            if method == "log_scalars":
                step, scalars = args
                # A resumed run repeats the steps after its checkpoint: log each metric's step once.
                scalars = {k: v for k, v in scalars.items() if step > last_steps.get(k, -math.inf)}
                if not scalars or not self._call(method, step, scalars):
                    continue
                last_steps.update(dict.fromkeys(scalars, step))
                self._save(run_id, last_steps)
            else:
                self._call(method, *args)
                if method == "close":
                    return

    def _call(self, method: str, *args) -> bool:
        """Make one call; a failure is counted and warned about once. Returns whether it succeeded."""
        try:
            getattr(self._tracker, method)(*args)
            return True
        except Exception as e:  # noqa: BLE001 - a tracker never stops training
            self.failed += 1
            self._warn_once(f"{method} failed ({type(e).__name__}: {e}); the run goes on, later failures are counted")
            return False

    def _save(self, run_id: str, last_steps: dict[str, int]) -> None:
        """Record the run id and the steps logged in trackers.json; a failure (disk full) warns like a tracker's."""
        try:
            self._state.update(self.name, {"run_id": run_id, "last_steps": last_steps})
        except OSError as e:
            self.failed += 1
            self._warn_once(f"cannot write {self._state.path} ({e}); a resume may log steps again")

    def _drain(self) -> None:
        """Discard what arrives until close, so that submit never finds a full queue of an absent tracker."""
        while self._queue.get()[0] != "close":
            pass

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            self._warn(message)

    def _warn(self, message: str) -> None:
        warnings.warn(f"tracker {self.name}: {message}", TrackerWarning, stacklevel=2)


class _StateFile:
    """workdir/trackers.json: {tracker: {"run_id": ..., "last_steps": {metric: step}}}, shared by the workers."""

    def __init__(self, path: str):
        self.path, self._lock = path, threading.Lock()

    def get(self, name: str) -> dict:
        with self._lock:
            return self._read().get(name, {})

    def update(self, name: str, entry: dict) -> None:
        with self._lock:
            state = self._read()
            state[name] = entry
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                json.dump(state, f, indent=1)
            os.replace(tmp, self.path)  # a kill mid-write leaves the previous file whole

    def _read(self) -> dict:
        if not os.path.exists(self.path):
            return {}
        with open(self.path) as f:
            return json.load(f)


def flatten(tree: Mapping, separator: str, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a<separator>b": 1}; lists and tuples become their text, other leaves stay."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, separator, name + separator))
        else:
            flat[name] = str(list(value)) if isinstance(value, (list, tuple)) else value
    return flat
