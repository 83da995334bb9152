"""What a training method may add to a run, as hooks of a `Task` whose defaults change nothing.

A run's tasks come from its config (`registry.for_run`); `jaxclf.train.build` calls every hook of
every task, in the run's task order, and folds the results: it never names a task. The hooks, in
the order a run calls them:

- `check_config` (a class method, on every registered task, at resolve time): check the config
  against the weights of `model_init` and settle what the task implies (notes for the console);
- `splits`: the splits the run trains and evaluates on (write anything the run keeps, too);
- `init_params`: `model_init`'s flat params before they are loaded into the new model;
- `class_counts`: training examples per class (for config.data.class_weights);
- `replay`: rows of every batch drawn from another source (at most one task per run);
- `loss`: the training loss, a sum of named terms (`steps.Loss`), each a pure function run
  inside the jitted step;
- `eval_groups` and `eval_metrics`: class groups the evaluation counts top-1 on, and metrics
  derived from an evaluation's (on the host, after it);
- `reopen` (a class method) with `report_sections`: the same task for a finished run, and what it
  adds to `jaxclf.evaluate`'s report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import ml_collections
import numpy as np
from flax import nnx

from jaxclf.data import sources
from jaxclf.training import steps


@dataclasses.dataclass(frozen=True)
class Replay:
    """`rows` of every global batch drawn from `source` (labelled in the run's classes), the rest from the training data."""

    source: sources.LabelledSource
    rows: int


class Task:
    """A training method: each hook receives what the run has so far and returns it, changed or not.

    A subclass is built once per run from the resolved config and the `model_init` weights' info
    (None without model_init); it is chosen when `applies` says so or when its `name` is listed in
    config.tasks (see `registry`).
    """

    name: str = ""

    def __init__(self, config: ml_collections.FrozenConfigDict, pretrained_info: object | None):
        self.config, self.pretrained_info = config, pretrained_info

    @classmethod
    def applies(cls, config: ml_collections.ConfigDict, pretrained_info: object | None) -> bool:
        """Whether a run of `config` (from weights `pretrained_info`) uses this task without naming it in config.tasks."""
        return False

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict, pretrained_info: object | None) -> list[str]:
        """Check (and, in place, settle) the fields this task reads; notes for the console. Runs for every
        registered task, used or not, so a field set for a task the run does not use is named."""
        return []

    def splits(self, splits: dict[str, sources.LabelledSource], workdir: str) -> dict[str, sources.LabelledSource]:
        return splits

    def init_params(self, params: dict[str, np.ndarray], model: nnx.Module) -> dict[str, np.ndarray]:
        return params

    def class_counts(self, counts: list[int]) -> list[int]:
        return counts

    def replay(self) -> Replay | None:
        return None

    def loss(self, loss: steps.Loss, class_names: tuple[str, ...]) -> steps.Loss:
        """The loss so far, for a model of `class_names`, with this task's terms."""
        return loss

    def eval_groups(self) -> dict[str, np.ndarray]:
        """{group name: class ids}: each evaluation also reports <prefix><group>_accuracy and _examples."""
        return {}

    def eval_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return metrics

    @classmethod
    def reopen(cls, config: ml_collections.ConfigDict, workdir: str) -> Task | None:
        """This task as the finished run in `workdir` used it, for `jaxclf.evaluate` (None: the run did not use it)."""
        return None

    def report_sections(self, source: sources.LabelledSource, log_probs: np.ndarray, labels: np.ndarray,
                        batch_size: int) -> dict[str, dict]:
        """{report key: JSON-ready section} for `jaxclf.evaluate`'s report of a finished run on `source`."""
        return {}

    def summary_lines(self, report: dict) -> dict[str, str]:
        """{heading: one line} summarising this task's report sections (report.md and the console)."""
        return {}


def fold(tasks: Sequence[Task], hook: str, value, *args):
    """`value` passed through `hook` of every task in order: task_n.hook(... task_1.hook(value, *args) ..., *args)."""
    for task in tasks:
        value = getattr(task, hook)(value, *args)
    return value
