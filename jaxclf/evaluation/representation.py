"""What the representation evaluators (knn, fewshot, linear_probe) share: frozen features of a train split
and an evaluation split from the run's feature store, scored without touching the model's head."""

from __future__ import annotations

import abc

import jax
import numpy as np
from flax import nnx

from jaxclf import config as config_lib
from jaxclf.evaluation import base, features as features_lib


class RepresentationEvaluator(base.Evaluator):
    """Options: `train_split` (the labelled examples a method fits on, default "train") and `split` (the
    examples it is scored on, default "val"), both splits of the run's data; a subclass adds its own."""

    options = {"train_split": "train", "split": "val"}

    def __init__(self, name: str, spec: dict, context: base.EvalContext):
        super().__init__(name, spec, context)
        for key in ("train_split", "split"):
            if self.spec[key] not in context.splits:
                raise self.option_error(key, f"the run's data has the splits {sorted(context.splits)}")
        self.train_labels = context.splits[self.spec["train_split"]].labels

    def option_error(self, key: str, problem: str) -> config_lib.ConfigError:
        """A ConfigError naming config.evals.<name>.<key> and its value."""
        return config_lib.ConfigError(f"config.evals.{self.name}.{key}={self.spec[key]!r}: {problem}")

    @jax.transfer_guard_device_to_host("allow")  # the training loop disallows implicit fetches (GPU)
    def evaluate(self, variants: dict[str, nnx.State], model_state: nnx.State) -> dict[str, dict[str, float]]:
        store = self.context.features
        results = {}
        for variant, params in variants.items():
            train = store.get(self.spec["train_split"], params, model_state)
            test = store.get(self.spec["split"], params, model_state)
            results[variant] = self.score(train, test)
        return results

    def close(self) -> None:
        self.context.features.close()

    @abc.abstractmethod
    def score(self, train: features_lib.SplitFeatures, test: features_lib.SplitFeatures) -> dict[str, float]:
        """Metrics of the method fitted on `train`'s features and scored on `test`'s."""


def top1_top5(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """{"accuracy", "top5"}: the share of rows whose label is the highest score, or among the 5 highest (all
    of them with fewer classes); ties go to the lower class id."""
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    hits = ranked == labels[:, None]
    return {"accuracy": float(hits[:, 0].mean()), "top5": float(hits.any(axis=1).mean())}
