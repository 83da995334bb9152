"""Settle everything a config leaves open, once, before anything is built: `resolve(config, platform, check_tasks)`.

The result is what a run records in config.json and what every later step reads: the compute
dtype and kernel set for the platform, the model options and mean/std the pretrained weights
imply, and the metric that picks the best checkpoint. Nothing changes the config after this.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_collections
import numpy as np

from jaxclf import config as config_lib, kernels, models, weights


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A resolved config (frozen), the pretrained weights it starts from, and notes for the console."""

    config: ml_collections.FrozenConfigDict
    pretrained: tuple[dict[str, np.ndarray], weights.Pretrained] | None
    notes: tuple[str, ...]


def resolve(config: ml_collections.ConfigDict, platform: str,
            check_tasks: Callable[[ml_collections.ConfigDict, object], list[str]],
            pretrained: tuple[dict[str, np.ndarray], weights.Pretrained] | None = None) -> Resolved:
    """`config` with its "auto" and empty fields settled for a run on `platform` ("cpu", "gpu", ...).
    `pretrained`: `config.model_init`'s weights when the caller has read them already (else read here).

    `check_tasks(config, weights info)` checks the training tasks' fields and settles what they imply,
    in place (`jaxclf.tasks.registry.check_config`); it returns notes.

    - dtype "auto": bfloat16 on accelerators, float32 on CPUs;
    - model.kernels ("auto" or unset): the kernel set for the platform;
    - model options the weights of `model_init` imply (e.g. a ViT's LayerNorm epsilon), where unset;
    - data.mean/std, where empty (and no task set them: continual.keep_preprocessing): those stored
      with the weights, else ImageNet's;
    - best_metric: with an EMA, val/* becomes val_ema/* (the EMA weights are the ones evaluate,
      predict and export load, as in timm's train.py).
    """
    config = ml_collections.ConfigDict(config.to_dict())
    notes = []
    pretrained = pretrained or _read_model_init(config)
    with config.unlocked():
        notes += check_tasks(config, pretrained[1] if pretrained else None)
    if config.dtype == "auto":
        config.dtype = "float32" if platform == "cpu" else "bfloat16"
    if config.dtype not in models.DTYPES:
        raise config_lib.ConfigError(f"config.dtype={config.dtype!r}: use 'auto', 'float32' or 'bfloat16'")
    try:
        models.options(config.model_name)
    except ValueError as e:
        raise config_lib.ConfigError(f"config.model_name: {e}") from None
    with config.unlocked():
        if pretrained:
            for key, value in pretrained[1].model_options.items():
                if key not in config.model:  # (ConfigDict has no setdefault)
                    config.model[key] = value
        try:
            config.model.kernels = kernels.resolve(config.model.get("kernels", "auto"), platform)
        except ValueError as e:
            raise config_lib.ConfigError(f"config.model.{e}") from None
    preprocessing = pretrained[1].preprocessing if pretrained else weights.IMAGENET
    for key in ("mean", "std"):
        if not config.data[key]:
            config.data[key] = tuple(preprocessing[key])
    if best_metric(config) != config.best_metric:
        notes.append(f"config.best_metric: {config.best_metric} -> {best_metric(config)} (an EMA is kept; its "
                     "weights are the ones evaluated and exported by default)")
        config.best_metric = best_metric(config)
    return Resolved(ml_collections.FrozenConfigDict(config), pretrained, tuple(notes))


def best_metric(config: ml_collections.ConfigDict) -> str:
    """The evaluation metric `config.best_metric` names in a run: with an EMA, val/* means val_ema/*."""
    if config.ema_decay > 0 and config.best_metric.startswith("val/"):
        return "val_ema/" + config.best_metric.removeprefix("val/")
    return config.best_metric


def _read_model_init(config: ml_collections.ConfigDict) -> tuple[dict[str, np.ndarray], weights.Pretrained] | None:
    """The weights `config.model_init` names, or None."""
    if not config.model_init:
        return None
    try:
        return weights.load(config.model_init, config.model_name)
    except weights.WeightsError as e:
        raise config_lib.ConfigError(f"config.model_init={config.model_init!r}: {e}") from None
