"""What happens after each evaluation, as small objects the training loop calls in order.

Each listener has `on_eval(step, metrics) -> Stop | None`; returning a `Stop` asks the loop to end
the run after checkpointing (early stopping, a search trial's pruner). A listener whose state must
survive a resume has `state_key` and `state()`, saved in the checkpoint's meta and given back to
its constructor. The loop knows nothing else about them.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import ml_collections

from jaxclf import config as config_lib
from jaxclf.tracking.metrics import MetricsWriter


@dataclasses.dataclass(frozen=True)
class Stop:
    """A request to end the run: `status` goes to result.json ("early_stopped", "pruned", "preempted")."""

    status: str
    message: str


class EvalListener(Protocol):
    def on_eval(self, step: int, metrics: dict[str, float]) -> Stop | None: ...


class WriteMetrics:
    """Writes each evaluation's metrics to metrics.jsonl, TensorBoard and the console."""

    def __init__(self, writer: MetricsWriter):
        self._writer = writer

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._writer.write(step, metrics)


class EarlyStopping:
    """Tracks the best value of `config.best_metric`; asks to stop after `early_stopping_patience`
    evaluations without improvement (0: never). Evaluations without any metric of best_metric's
    prefix (another evaluator's, at its own interval) are not counted."""

    state_key = "early_stopping"

    def __init__(self, config: ml_collections.ConfigDict, saved: dict | None):
        if config.best_mode not in ("max", "min"):
            raise config_lib.ConfigError(f"config.best_mode={config.best_mode!r}: use 'max' or 'min'")
        self._metric, self._mode = config.best_metric, config.best_mode
        self._patience = config.early_stopping_patience
        saved = saved or {"best_step": None, "best_value": None, "evals_since_best": 0}
        self.best_step, self.best_value = saved["best_step"], saved["best_value"]
        self.evals_since_best = saved["evals_since_best"]

    def on_eval(self, step: int, metrics: dict[str, float]) -> Stop | None:
        prefix = self._metric.rpartition("/")[0] + "/"
        if self._metric not in metrics and not any(key.startswith(prefix) for key in metrics):
            return None  # another evaluator's turn (config.evals): this evaluation does not rank the run
        if self._metric not in metrics:
            raise config_lib.ConfigError(
                f"config.best_metric={self._metric!r} is not an evaluation metric; choose one of {sorted(metrics)}"
            )
        value = float(metrics[self._metric])
        better = self.best_value is None or (value > self.best_value if self._mode == "max" else value < self.best_value)
        if better:
            self.best_step, self.best_value, self.evals_since_best = step, value, 0
        else:
            self.evals_since_best += 1
        if not (self._patience and self.evals_since_best >= self._patience):
            return None
        return Stop("early_stopped", (
            f"Early stopping at step {step}: {self._metric} has not improved for {self.evals_since_best} "
            f"evaluations; best {self.best_value:.4g} at step {self.best_step} (its checkpoint is kept)"))

    def state(self) -> dict:
        return {"best_step": self.best_step, "best_value": self.best_value, "evals_since_best": self.evals_since_best}
