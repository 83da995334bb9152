"""The evaluators of a run: `config.evals` ({name: spec}, each spec naming its `type`), or, when empty,
one classification evaluator on the val split under "val/" every `config.eval_every_epochs`."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxclf import config as config_lib
from jaxclf.data import sources
from jaxclf.evaluation import base, classification, features, fewshot, knn, linear_probe
from jaxclf.runs import inference
from jaxclf.training import sharding, steps

_TYPES = config_lib.ClassRegistry(base.Evaluator, "type", (classification.Classification, fewshot.FewShot,
                                                           knn.KNN, linear_probe.LinearProbe))
register = _TYPES.register

DEFAULT = {"val": {"type": "classification", "split": "val", "prefix": "val/"}}


def specs(evals) -> dict[str, dict]:
    """{name: spec} of `config.evals` as plain dicts: the default when it is empty; a spec named like a
    default evaluator fills its other keys from it (`--config.evals.val.every_steps=100` alone works)."""
    configured = evals.to_dict() if hasattr(evals, "to_dict") else dict(evals)
    return {name: {**DEFAULT.get(name, {}), **spec} for name, spec in configured.items()} or DEFAULT


def build(context: base.EvalContext) -> list[base.Evaluator]:
    """The evaluators of `context.config.evals`, built for `context` (sharing one feature store)."""
    if context.features is None:
        context = dataclasses.replace(context, features=features.FeatureStore(
            context.config, context.mesh, context.graphdef, context.state_sharding, context.splits))
    evaluators = []
    for name, spec in specs(context.config.evals).items():
        if not isinstance(spec, dict) or spec.get("type") not in _TYPES:
            raise config_lib.ConfigError(
                f"config.evals.{name}: give a dict with a 'type', one of {_TYPES.names()}; got {spec!r}"
            )
        evaluators.append(_TYPES[spec["type"]](name, spec, context))
    return evaluators


def run_on(trained: inference.TrainedModel, splits: dict[str, sources.LabelledSource],
           class_groups: dict[str, np.ndarray]) -> dict[str, float]:
    """The metrics of the finished run's configured evaluators on its checkpoint (one device), named as
    training logged them: an EMA checkpoint's under `<prefix minus "/">_ema/`."""
    return metrics_of(trained.model, trained.config, splits, sharding.make_mesh(jax.devices()[:1]), class_groups,
                      variant="ema" if trained.weights == "ema" else "")


def metrics_of(model: nnx.Module, config, splits: dict[str, sources.LabelledSource], mesh: Mesh,
               class_groups: dict[str, np.ndarray] | None = None, variant: str = "") -> dict[str, float]:
    """The metrics of `config.evals` on `model` (in eval mode), its variables replicated over `mesh`, as
    `variant`'s ("" or "ema")."""
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    layout = sharding.state_sharding(steps.TrainState(step=None, params=params, model_state=model_state,
                                                      opt_state=None), mesh, "replicate")
    context = base.EvalContext(config, mesh, graphdef, layout, splits, class_groups or {})
    params, model_state = jax.device_put((params, model_state), sharding.replicated(mesh))
    evaluators = build(context)
    try:
        return {name: float(value) for evaluator in evaluators
                for name, value in evaluator.metrics({variant: params}, model_state).items()}
    finally:
        for evaluator in evaluators:
            evaluator.close()
