"""The classification evaluator (the default): loss, top-1 ("accuracy") and top-5 over a split, and top-1 on
each class group the run's tasks name (continual learning's old and new classes)."""

from __future__ import annotations

import jax
from flax import nnx

from jaxclf import config as config_lib
from jaxclf.evaluation import base, features
from jaxclf.tracking import progress as progress_lib
from jaxclf.training import sharding, steps


class Classification(base.Evaluator):
    """Options: `split` (a split of the run's data, default "val")."""

    type = "classification"
    options = {"split": "val"}

    def __init__(self, name: str, spec: dict, context: base.EvalContext):
        super().__init__(name, spec, context)
        config, split = context.config, self.spec["split"]
        if split not in context.splits:
            raise config_lib.ConfigError(
                f"config.evals.{name}.split={split!r}: the run's data has the splits {sorted(context.splits)}"
            )
        self._eval_step = steps.make_eval_step(
            context.graphdef, context.mesh, context.state_sharding, mean=tuple(config.data.mean),
            std=tuple(config.data.std), class_groups=context.class_groups,
        )
        self._loader = features.eval_loader(context.splits[split], config)

    def close(self) -> None:
        self._loader.close()

    @jax.transfer_guard_device_to_host("allow")
    def evaluate(self, variants: dict[str, nnx.State], model_state: nnx.State) -> dict[str, dict[str, float]]:
        """One pass over the split for every variant: {loss, accuracy, top5, examples}, and per class group
        <group>_accuracy and <group>_examples (where the split has examples of it)."""
        mesh, groups = self.context.mesh, tuple(self.context.class_groups)
        totals = {variant: steps.zero_eval_totals(mesh, groups) for variant in variants}
        for batch in progress_lib.track(self._loader.one_pass(), "evaluating", total=self._loader.num_batches):
            batch = sharding.shard_batch(batch, mesh)
            for variant, params in variants.items():
                totals[variant] = self._eval_step(params, model_state, batch, totals[variant])
        results = {}
        for variant, sums in jax.device_get(totals).items():
            count = sums["count"]
            metrics = {"loss": sums["loss"] / count, "accuracy": sums["top1"] / count, "top5": sums["top5"] / count,
                       "examples": count}
            for group in groups:
                if sums[f"{group}_count"]:  # a group without examples in the split has no accuracy
                    metrics[f"{group}_accuracy"] = sums[f"{group}_top1"] / sums[f"{group}_count"]
                    metrics[f"{group}_examples"] = sums[f"{group}_count"]
            results[variant] = metrics
        return results
