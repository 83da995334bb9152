"""Evaluators run on pretrained weights with no training: `jaxclf.evaluate --model_init A,B --data.root DIR`.

Each backbone's config is the defaults (plus `--config.a.b=VALUE` overrides) with `model_init` set and
resolved as training would resolve it (model options and mean/std from the weights); its eval
preprocessing, unless overridden, is the one the weights carry (a finished run's `data.pp_eval`, else
resize_small(input_size / crop_pct) and central_crop(input_size) with the weights' interpolation).
The head is whatever loading gives a model with the data's class count (the representation
evaluators never read it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import ml_collections
from flax import nnx

from jaxclf import config as config_lib, data as data_lib, models, weights
from jaxclf.evaluation import registry
from jaxclf.tasks import registry as task_registry
from jaxclf.training import resolve as resolve_lib, sharding


def eval_preprocessing(info) -> str:
    """The eval ops the weights' recorded preprocessing implies (see the module docstring)."""
    recorded = info.preprocessing
    if recorded.get("pp_eval"):
        return recorded["pp_eval"]
    size = recorded.get("input_size")
    if not size:
        raise config_lib.ConfigError(
            f"config.model_init={info.source!r}: the weights record no input size; give "
            "--config.data.pp_eval=decode|resize_small(N)|central_crop(M)")
    method = recorded.get("interpolation", "bilinear")
    resize = math.floor(size / recorded.get("crop_pct", 1.0))
    return f"decode|resize_small({resize}, method={method!r})|central_crop({size})"


def backbone_config(model_init: str, evals: Sequence[str], overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """The defaults with `model_init`, one evaluator of each type in `evals` (named like it) and `overrides`
    ("a.b=VALUE", e.g. "data.root=DIR", "evals.knn.k=10") applied."""
    config = config_lib.base_config()
    config.model_init = model_init
    for name in evals:
        config.evals[name] = ml_collections.ConfigDict({"type": name})
    for override in overrides:
        config_lib.apply_override(config, override)
    return config


def evaluate_backbone(config: ml_collections.ConfigDict, pp_eval_given: bool,
                      devices: Sequence[jax.Device] | None = None) -> dict[str, float]:
    """The metrics of `config.evals` on `config.model_init`'s weights over `devices` (default: all),
    the eval preprocessing from the weights unless `pp_eval_given`."""
    if not config.model_init:
        raise config_lib.ConfigError("config.model_init: name the weights to evaluate")
    try:
        pretrained = weights.load(config.model_init)
    except weights.WeightsError as e:
        raise config_lib.ConfigError(f"config.model_init={config.model_init!r}: {e}") from None
    config = ml_collections.ConfigDict(config.to_dict())
    config.model_name = pretrained[1].model_name
    if not pp_eval_given:
        config.data.pp_eval = eval_preprocessing(pretrained[1])
    mesh = sharding.make_mesh(devices)
    resolved = resolve_lib.resolve(config, mesh.devices.flat[0].platform, task_registry.check_config, pretrained)
    config = resolved.config
    splits = data_lib.load_splits(config.data)
    sharding.check_batch_size(config.eval_batch_size or config.batch_size, mesh, "eval_batch_size")
    try:
        model = models.create_model(config, len(splits["train"].class_names))
        weights.apply(model, resolved.pretrained[0], dont_load=tuple(config.model_init_dont_load),
                      pos_interpolation=config.model_init_pos_interpolation)
    except (ValueError, TypeError, weights.WeightsError) as e:
        raise config_lib.ConfigError(f"config.model_init={config.model_init!r}: {e}") from None
    model.eval()
    return registry.metrics_of(model, config, splits, mesh)
