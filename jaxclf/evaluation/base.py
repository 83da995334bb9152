"""Evaluators: named evaluations a config lists in `config.evals`, each with its metrics prefix and interval.

    config.evals = {"val": {"type": "classification", "split": "val", "prefix": "val/", "every_epochs": 1.0}}

An evaluator runs on model variables (params and the other model state), so the same object
evaluates a training run's state (`jaxclf.train`, every `every_steps`, and its EMA params under
`<prefix minus "/">_ema/`) and a finished run's checkpoint (`jaxclf.evaluate`). A new kind of
evaluation is one file: a subclass of `Evaluator` registered in `evaluation.registry`.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxclf import config as config_lib
from jaxclf.data import sources
from jaxclf.evaluation import features as features_lib

# The spec keys every evaluator reads; its own keys come on top (`Evaluator.options`).
COMMON_KEYS = ("type", "prefix", "every_epochs", "every_steps")


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """What evaluators are built from: the run's resolved config and splits, the model's eval graphdef with the
    layout of its variables on `mesh` (`state_sharding.params`, `.model_state`), the class groups the
    run's tasks count top-1 on, the training's steps per epoch (for `every_epochs`; 0 outside training), and
    the frozen-feature store the representation evaluators share (`registry.build` makes one)."""

    config: ml_collections.FrozenConfigDict
    mesh: Mesh
    graphdef: nnx.GraphDef
    state_sharding: object
    splits: dict[str, sources.LabelledSource]
    class_groups: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    steps_per_epoch: int = 0
    features: features_lib.FeatureStore | None = None


class Evaluator(abc.ABC):
    """One configured evaluation. A subclass sets `type`, lists its own spec keys in `options` (with
    defaults), and defines `evaluate`."""

    type: str = ""
    options: dict = {}

    def __init__(self, name: str, spec: dict, context: EvalContext):
        unknown = sorted(set(spec) - set(COMMON_KEYS) - set(self.options))
        if unknown:
            raise config_lib.ConfigError(
                f"config.evals.{name}: {unknown} are not options of a {self.type!r} evaluator "
                f"(it takes {sorted(set(COMMON_KEYS) | set(self.options))})"
            )
        self.name, self.context = name, context
        self.spec = {**self.options, **spec}
        self.prefix = spec.get("prefix", f"{name}/")
        if not self.prefix.endswith("/"):
            raise config_lib.ConfigError(f"config.evals.{name}.prefix={self.prefix!r} must end with '/'")
        every_epochs = spec.get("every_epochs", context.config.eval_every_epochs)
        self.every_steps = int(spec.get("every_steps", 0)) or max(1, round(every_epochs * context.steps_per_epoch))

    @abc.abstractmethod
    def evaluate(self, variants: dict[str, nnx.State], model_state: nnx.State) -> dict[str, dict[str, float]]:
        """{variant: metrics} for each of `variants` ({name: params on the mesh}, e.g. "" and "ema"),
        sharing `model_state` (BatchNorm statistics); metric names without the prefix."""

    def close(self) -> None:
        """Release what the evaluator holds between evaluations (e.g. a loader's worker processes)."""

    def metrics(self, variants: dict[str, nnx.State], model_state: nnx.State) -> dict[str, float]:
        """`evaluate`'s metrics under this evaluator's prefix, a variant's after `<prefix>_<variant>/`."""
        results = {}
        for variant, metrics in self.evaluate(variants, model_state).items():
            prefix = f"{self.prefix.removesuffix('/')}_{variant}/" if variant else self.prefix
            results.update({prefix + key: value for key, value in metrics.items()})
        return results


class Evaluations:
    """A run's evaluators as the training loop calls them: due at each one's interval and at the last step;
    `derive` adds metrics computed from an evaluation's (the tasks' `eval_metrics`)."""

    def __init__(self, evaluators: Sequence[Evaluator], total_steps: int,
                 derive: Callable[[dict[str, float]], dict[str, float]] = dict):
        self.evaluators, self.total_steps, self._derive = tuple(evaluators), total_steps, derive

    def check_metric(self, metric: str, field: str) -> None:
        """Fail, naming `field`, unless some evaluator reports `metric` (by its prefix, or its EMA's)."""
        prefixes = [p for e in self.evaluators for p in (e.prefix, f"{e.prefix.removesuffix('/')}_ema/")]
        if not any(metric.startswith(prefix) for prefix in prefixes):
            raise config_lib.ConfigError(
                f"{field}={metric!r} is not a metric of the run's evaluators (config.evals: prefixes "
                f"{[e.prefix for e in self.evaluators]})"
            )

    @property
    def every_steps(self) -> int:
        """The shortest interval (checkpoints default to it)."""
        return min(e.every_steps for e in self.evaluators)

    def close(self) -> None:
        for evaluator in self.evaluators:
            evaluator.close()

    def due(self, step: int) -> bool:
        return step == self.total_steps or any(step % e.every_steps == 0 for e in self.evaluators)

    def __call__(self, state, step: int | None = None) -> dict[str, float]:
        """The metrics of every evaluator due at `step` (all of them with None) on a train state (its EMA too)."""
        variants = {"": state.params} if state.ema_params is None else {"": state.params, "ema": state.ema_params}
        metrics = {}
        for evaluator in self.evaluators:
            if step is None or step == self.total_steps or step % evaluator.every_steps == 0:
                metrics.update(evaluator.metrics(variants, state.model_state))
        return self._derive(metrics)
