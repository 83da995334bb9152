"""Stop requests from the scheduler: SIGTERM, SIGINT and SIGUSR1 end the run at a step boundary.

SLURM (`--signal=USR1@T`, scancel, preemption) and Kubernetes send these before killing a job.
The handler only records the signal; the loop checkpoints at the next step and exits with
`EXIT_PREEMPTED`, so the same command, run again, resumes.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

# EX_TEMPFAIL from sysexits.h: a temporary failure; running the same command again resumes.
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped on a signal after saving a checkpoint at `step`."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"stopped by {signal_name} at step {step} after saving a checkpoint; run again to resume")
        self.step = step


class StopSignals:
    """Context manager recording the first stop signal; restores the previous handlers on exit."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _record(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def should_stop(self, at_sync_point: bool) -> bool:
        """Whether every process should stop now.

        With one process this is just whether a signal arrived. With several, processes agree at
        sync points only (the loop's logging steps, which every process reaches together), so all
        stop at the same step and save one consistent checkpoint.
        """
        if jax.process_count() == 1:
            return self.received is not None
        if not at_sync_point:
            return False
        with jax.transfer_guard_device_to_host("allow"):
            flags = multihost_utils.process_allgather(np.int32(self.received is not None))
        if flags.any() and self.received is None:
            self.received = "a stop signal on another process"
        return bool(flags.any())
