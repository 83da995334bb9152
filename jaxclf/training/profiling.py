"""`config.profile_steps=(start, end)`: a jax.profiler trace of those train steps, written into the workdir.

The trace lands in `workdir/plugins/profile/<time>/<host>.xplane.pb`, where TensorBoard's profile
plugin and xprof look for it (`tensorboard --logdir WORKDIR`, Profile tab). Each traced step runs
under `jax.profiler.StepTraceAnnotation("train_step", step_num=step)`, so the viewers split the
trace by step. The only host sync it adds is waiting for step `end` to finish before the trace stops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import jax

from jaxclf.config import ConfigError


class ProfileConfigError(ConfigError):
    """An unusable `config.profile_steps`; the message names it."""


def check(profile_steps: Sequence[int]) -> tuple[int, int] | None:
    """(start, end) of a valid `config.profile_steps`, None for () (off)."""
    if not profile_steps:
        return None
    if len(profile_steps) != 2 or not all(isinstance(s, int) for s in profile_steps) \
            or not 1 <= profile_steps[0] <= profile_steps[1]:
        raise ProfileConfigError(
            f"config.profile_steps={tuple(profile_steps)!r}: give (start, end), the first and last train step to "
            "trace (1 <= start <= end), e.g. (10, 12), or () for no trace")
    return int(profile_steps[0]), int(profile_steps[1])


class StepProfiler:
    """Traces steps start..end (inclusive) of a run into `logdir`; does nothing outside them or when off."""

    def __init__(self, profile_steps: Sequence[int], logdir: str):
        self._range = check(profile_steps)
        self._logdir = logdir
        self._tracing = False

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Wrap the dispatch of train step `step`: starts the trace at `start`, annotates traced steps."""
        if self._range is None or not self._range[0] <= step <= self._range[1]:
            yield
            return
        if not self._tracing:  # also a run resumed inside the range starts tracing there
            jax.profiler.start_trace(self._logdir)
            self._tracing = True
        with jax.profiler.StepTraceAnnotation("train_step", step_num=step):
            yield

    def step_done(self, step: int, outputs) -> None:
        """After step `step` is dispatched: at `end`, wait for `outputs` (the device work) and stop the trace."""
        if self._tracing and step == self._range[1]:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        """Stop a trace still running (a run that ended or stopped inside the range)."""
        if self._tracing:
            jax.profiler.stop_trace()
            self._tracing = False
