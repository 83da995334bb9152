"""Which tasks a run has: plain classification always, the built-in tasks whose config asks for them,
and any task registered by user code that config.tasks names.

    from jaxclf.tasks import base, registry

    @registry.register
    class Sharpen(base.Task):
        name = "sharpen"
        def loss(self, loss, class_names):
            return loss.plus("sharpen", lambda inputs: 0.1 * entropy(inputs.logits))

then `--config.tasks='("sharpen",)'` (the registering file imported first, e.g. the config file).
"""

from __future__ import annotations

import ml_collections

from jaxclf import config as config_lib
from jaxclf.tasks import base, classification, continual, distill

# In the order their hooks run: distillation scales the loss terms before it, so continual
# learning's LwF term (after it) is not scaled by (1 - alpha).
_TASKS = config_lib.ClassRegistry(base.Task, "name", (
    classification.Classification, distill.Distillation, continual.Continual))
register = _TASKS.register


def for_run(config: ml_collections.FrozenConfigDict, pretrained_info: object | None) -> list[base.Task]:
    """The tasks of a run of the resolved `config` from `model_init`'s weights info (None without model_init)."""
    unknown = [name for name in config.tasks if name not in _TASKS]
    if unknown:
        raise config_lib.ConfigError(
            f"config.tasks names {unknown}, which no code registered (registered: {_TASKS.names()}); import the "
            "file that registers it first (e.g. define it in the config file)"
        )
    return [task(config, pretrained_info) for task in _TASKS.classes()
            if task.name in config.tasks or task.applies(config, pretrained_info)]


def reopen(config: ml_collections.ConfigDict, workdir: str) -> list[base.Task]:
    """The tasks of the finished run in `workdir` that have something to add to its evaluation."""
    return [task for task in (cls.reopen(config, workdir) for cls in _TASKS.classes()) if task is not None]


def check_config(config: ml_collections.ConfigDict, pretrained_info: object | None) -> list[str]:
    """Every registered task's `check_config` on `config` (in place, unlocked); their notes."""
    return [note for task in _TASKS.classes() for note in task.check_config(config, pretrained_info)]
