"""The training loop's moving parts, so that `train.py`'s loop body reads step -> log -> evaluate -> save.

`TrainingLoop` owns what happens around each train step: the next batch (and its position in
the data, for the checkpoint), the train log, evaluations and their listeners, checkpoints, and
stop signals. Only `TrainLog.flush`, evaluations and checkpoints read values back from the device.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator, Sequence
from typing import Protocol

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxclf.runs import checkpoint
from jaxclf.training import preemption, sharding, steps
from jaxclf.tracking import progress as progress_lib
from jaxclf.training.listeners import EvalListener, Stop

PREFETCH_BATCHES = 2


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or Inf (config.nonfinite_loss="stop")."""


class TrainLog:
    """Per-step train metrics kept on the device and written as window means at log steps.

    Reading them back is the loop's only host sync. A non-finite loss stops the run (or, with
    `nonfinite_loss="skip"`, is counted in `train/skipped_steps`: the step made no update and did
    not advance the LR schedule).
    Unreadable images the loaders replaced (config.data.bad_images="skip"), summed over processes
    at each flush (which every process calls at the same steps), are counted in
    `data/skipped_images`.
    """

    def __init__(self, writer, schedule, batch_size: int, steps_per_epoch: int, nonfinite_loss: str, step: int,
                 skipped: dict, progress: progress_lib.TrainProgress | None = None):
        """`skipped`: the counts a resumed run's checkpoint holds (`skipped()`), else {}; `progress`
        shows each window on the console."""
        self._writer, self._schedule, self._progress = writer, schedule, progress
        self._batch_size, self._steps_per_epoch = batch_size, steps_per_epoch
        self._nonfinite_loss = nonfinite_loss
        self._pending: list[dict] = []
        self._skipped = skipped.get("steps", 0)
        self._skipped_images = skipped.get("images", 0)
        self.restart_clock(step)

    def skipped(self) -> dict:
        """The run's counts so far of skipped steps and skipped images, for the checkpoint."""
        return {"steps": self._skipped, "images": self._skipped_images}

    def add(self, metrics: dict) -> None:
        self._pending.append(metrics)

    def restart_clock(self, step: int) -> None:
        self._clock, self._clock_step = time.perf_counter(), step

    @jax.transfer_guard_device_to_host("allow")
    def flush(self, step: int) -> None:
        """Write the mean of the metrics since the last flush; raise NonFiniteLoss in "stop" mode."""
        if not self._pending:
            return
        fetched = jax.device_get(self._pending)
        per_step = {k: np.asarray([m[k] for m in fetched]) for k in fetched[0]}
        first_step = step - len(fetched) + 1
        self._pending.clear()
        bad = ~np.isfinite(per_step["loss"])
        if bad.any() and self._nonfinite_loss == "stop":
            raise NonFiniteLoss(
                f"the training loss became {per_step['loss'][bad.argmax()]} at step {first_step + bad.argmax()}; "
                "the last checkpoint before it is kept. Try a lower config.optim.lr, more warmup "
                "(config.optim.warmup_epochs), config.dtype='float32', or config.nonfinite_loss='skip'"
            )
        self._skipped += int(per_step.pop("skipped").sum())
        window_skipped_images = int(per_step.pop("skipped_images").sum())
        if jax.process_count() > 1:  # each process counted what its own loader replaced
            window_skipped_images = int(multihost_utils.process_allgather(np.int32(window_skipped_images)).sum())
        self._skipped_images += window_skipped_images
        good = ~bad
        scalars = {f"train/{k}": float(np.mean(v[good])) if good.any() else float("nan") for k, v in per_step.items()}
        now = time.perf_counter()
        scalars["train/images_per_sec"] = (step - self._clock_step) * self._batch_size / (now - self._clock)
        # A skipped step keeps the previous optimizer state, schedule count included: the count is
        # the number of steps that updated, and the latest update used schedule(count - 1).
        scalars["train/lr"] = float(self._schedule(max(step - 1 - self._skipped, 0)))
        scalars["train/skipped_steps"] = self._skipped
        scalars["data/skipped_images"] = self._skipped_images
        scalars["epoch"] = step / self._steps_per_epoch
        self._writer.write(step, scalars)
        if self._progress:
            self._progress.log_line(step, scalars)
        self.restart_clock(step)


def prefetch_to_mesh(iterator, mesh: Mesh) -> Iterator[tuple[dict, bytes, int]]:
    """Yield (global batch on the mesh, iterator state just after it, unreadable images this process
    replaced in it), copying ahead of use.

    The state travels with its batch so a checkpoint records the position of the last batch the
    model consumed, not of the batches already prefetched.
    """
    queue = collections.deque()
    try:
        while True:
            while len(queue) < PREFETCH_BATCHES:
                batch = next(iterator)
                skipped_images = int(batch.pop("skipped").sum())
                queue.append((sharding.shard_batch(batch, mesh), iterator.get_state(), skipped_images))
            yield queue.popleft()
    finally:
        # Batches from data workers live in shared memory until freed: free them now, not at exit (see close).
        queue.clear()


class Evaluations(Protocol):
    """The run's evaluations, as the loop calls them (`jaxclf.evaluation.base.Evaluations`)."""

    def due(self, step: int) -> bool: ...

    def __call__(self, state: steps.TrainState, step: int | None = None) -> dict[str, float]: ...


class TrainingLoop:
    """Everything around the train step, called in order each step: `next_batch`, `log`, `evaluate`, `save`.

    Evaluates where `evaluations` says it is due (`jaxclf.evaluation.base.Evaluations`: each
    evaluator at its interval, all at the last step); checkpoints every `checkpoint_every` steps, at
    every evaluation, at `end_step` and on a stop; a stop signal (SIGTERM, SLURM's warning)
    checkpoints and raises `preemption.Preempted` at the next sync point.
    """

    def __init__(self, *, train_iter, mesh: Mesh, evaluations: Evaluations,
                 checkpointer: checkpoint.Checkpointer, train_log: TrainLog, listeners: Sequence[EvalListener],
                 signals: preemption.StopSignals, meta: dict, end_step: int, log_every: int,
                 checkpoint_every: int, progress: progress_lib.TrainProgress):
        self._batches = prefetch_to_mesh(train_iter, mesh)
        self._progress = progress
        self._first_step_started: float | None = None
        self._evaluations, self._checkpointer, self._train_log = evaluations, checkpointer, train_log
        self._listeners, self._signals, self._meta = list(listeners), signals, meta
        self._end_step = end_step
        self._log_every, self._checkpoint_every = log_every, checkpoint_every
        self._data_state = None  # the data position after the newest trained batch
        self._skipped_images = 0
        self._signalled = False
        self._eval_metrics: dict | None = None  # this step's evaluation, for its checkpoint
        self.last_eval_metrics: dict[str, float] = {}

    def close(self) -> None:
        """Drop the prefetched batches. Those from grain's workers are shared memory that the last holder
        unlinks; still held at interpreter exit, Python's resource_tracker reports them leaked."""
        self._batches.close()

    def next_batch(self, step: int, state: steps.TrainState) -> dict:
        """The batch for `step`. If a stop signal ended the data workers, checkpoints the last step and
        raises Preempted (a signal sent to the whole process group reaches them too)."""
        if self._first_step_started is None:
            progress_lib.say("compiling the train step (the first step waits for it) ...")
            self._first_step_started = time.perf_counter()
        try:
            batch, self._next_data_state, self._skipped_images = next(self._batches)
        except Exception:
            if self._signals.received is None:
                raise
            if self._data_state is not None:
                self._checkpoint(step - 1, state, None)
            raise preemption.Preempted(step - 1, self._signals.received) from None
        return batch

    def log(self, step: int, metrics: dict) -> None:
        """Keep `step`'s metrics (read back at the next log step) and check for stop signals."""
        if self._data_state is None:
            progress_lib.say(f"first step compiled and dispatched in {time.perf_counter() - self._first_step_started:.1f}s")
        self._data_state = self._next_data_state
        self._progress.step()
        self._train_log.add({**metrics, "skipped_images": self._skipped_images})
        log_now = step % self._log_every == 0 or step == self._end_step
        self._signalled = self._signals.should_stop(at_sync_point=log_now)
        if log_now:
            self._train_log.flush(step)

    def evaluate(self, step: int, state: steps.TrainState) -> Stop | None:
        """Evaluate if due and tell every listener; a listener's Stop (or None) comes back."""
        if self._signalled or not self._evaluations.due(step):
            return None
        self._train_log.flush(step)  # the training window's throughput, before evaluation time
        try:
            metrics = self._evaluations(state, step)
        except Exception:
            if self._signals.received is None:
                self._checkpoint(step, state, None)  # keep the training done; the evaluation's error follows
                raise
            self._signalled = True  # the signal ended the evaluation's data workers
            return None
        self._eval_metrics = self.last_eval_metrics = metrics
        self._train_log.restart_clock(step)  # evaluation time is not training throughput
        stops = [listener.on_eval(step, metrics) for listener in self._listeners]
        return next((stop for stop in stops if stop is not None), None)

    def save(self, step: int, state: steps.TrainState, stop: Stop | None) -> None:
        """Checkpoint if due (or stopping); after a stop signal, raise Preempted."""
        if step % self._checkpoint_every == 0 or step == self._end_step or stop or self._signalled or self._eval_metrics:
            self._checkpoint(step, state, self._eval_metrics)
        self._eval_metrics = None
        if self._signalled:
            raise preemption.Preempted(step, self._signals.received)

    def _checkpoint(self, step: int, state: steps.TrainState, metrics: dict | None) -> None:
        self._train_log.flush(step)  # never checkpoint a state whose loss was not checked
        for listener in self._listeners:
            if hasattr(listener, "state"):
                self._meta[listener.state_key] = listener.state()
        self._meta["skipped"] = self._train_log.skipped()
        with jax.transfer_guard_device_to_host("allow"):
            self._checkpointer.save(step, state, checkpoint.IteratorState(self._data_state), self._meta, metrics)

