"""A fine-tuned ResNet, ViT (DINOv2, SigLIP, CLIP included), EVA-02, BiT, EfficientNet, MobileNetV3 or ConvNeXt back to PyTorch: a timm-named `.safetensors` state dict and the
`timm.create_model(...)` call that loads it (`python -m jaxclf.export --format timm`).

The names come from each family's `NameTable` in jaxclf/weights (the one the converters read
timm files with), used the other way. The state dict is written with numpy (the `safetensors`
package); when torch and timm are installed, the export loads it into timm and checks that timm's
logits equal jaxclf's before keeping it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import numpy as np
from flax import nnx

from jaxclf.runs import inference
from jaxclf.models import convnext, efficientnet, eva, resnet, resnetv2, tree_paths, vit
from jaxclf.weights import bit as bit_weights, convnext as convnext_weights, efficientnet as efficientnet_weights
from jaxclf.weights import resnet as resnet_weights, torch_names, vit as vit_weights


class TimmExportError(ValueError):
    """A model timm cannot represent (family, options) or a state dict timm does not reproduce; the message says which."""


@dataclasses.dataclass(frozen=True)
class TimmModel:
    """What `timm.create_model` needs: the architecture's name and the keyword arguments for this run."""

    name: str
    kwargs: dict

    def call(self, weights_file: str, mean: tuple, std: tuple, height: int, width: int) -> str:
        """The Python call that builds the model with the weights of `weights_file` and the run's
        preprocessing in its pretrained_cfg (so timm.data.resolve_data_config finds it)."""
        options = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        overlay = (f"dict(file={weights_file!r}, num_classes={self.kwargs['num_classes']!r}, mean={tuple(mean)!r}, "
                   f"std={tuple(std)!r}, input_size={(3, height, width)!r})")
        return f"timm.create_model({self.name!r}, pretrained=True, pretrained_cfg_overlay={overlay}{options})"


def _no_options(model: nnx.Module) -> dict:
    return {}


def _vit_kwargs(model: vit.VisionTransformer) -> dict:
    norm = model.fc_norm if model.global_pool == "avg" else model.norm
    if model.has_pre_logits:
        raise TimmExportError("timm's VisionTransformer has no pre-logits (representation) layer; this ViT has one")
    timm_eps = 1e-5 if model.pre_norm else 1e-6  # timm's CLIP towers (pre_norm) use 1e-5, its other ViTs 1e-6
    if norm.epsilon != timm_eps:
        raise TimmExportError(f"timm's ViTs use LayerNorm eps {timm_eps:g}; this one uses {norm.epsilon:g} (model.norm_eps)")
    act = model.blocks[0].mlp.act
    return {"img_size": model.img_size, "depth": len(model.blocks), "global_pool": model.global_pool,
            "class_token": model.has_class_token, "reg_tokens": model.num_reg_tokens,
            "no_embed_class": model.no_embed_class, **({"act_layer": act} if act != "gelu" else {})}


def _eva_kwargs(model: eva.Eva) -> dict:
    return {"img_size": model.img_size, "depth": len(model.blocks), "global_pool": model.global_pool}


def _efficientnet_kwargs(model: efficientnet.EfficientNet) -> dict:
    """The port's numerics, where they are not timm's defaults (timm's builders take both)."""
    kwargs = {"pad_type": "same"} if model.padding == "same" else {}
    return {**kwargs, "bn_eps": model.bn_eps} if model.bn_eps != 1e-5 else kwargs


# model class -> (name table, the timm keyword arguments its options imply)
_FAMILIES: dict[type, tuple[torch_names.NameTable, Callable[[nnx.Module], dict]]] = {
    resnet.ResNet: (resnet_weights.TABLE, _no_options),
    vit.VisionTransformer: (vit_weights.TABLE, _vit_kwargs),
    eva.Eva: (vit_weights.TABLE, _eva_kwargs),
    resnetv2.ResNetV2: (bit_weights.TABLE, _no_options),
    efficientnet.EfficientNet: (efficientnet_weights.TABLE, _efficientnet_kwargs),
    efficientnet.MobileNetV3: (efficientnet_weights.TABLE, _efficientnet_kwargs),
    convnext.ConvNeXt: (convnext_weights.TABLE, _no_options),
}


def timm_model(trained: inference.TrainedModel) -> TimmModel:
    """The timm architecture and options of the run's model (its registered name is timm's)."""
    family = _FAMILIES.get(type(trained.model))
    if family is None:
        raise TimmExportError(f"{trained.model_name} ({type(trained.model).__name__}) has no timm counterpart; "
                              f"--format timm exports {', '.join(c.__name__ for c in _FAMILIES)}")
    return TimmModel(trained.model_name, {"num_classes": len(trained.class_names), **family[1](trained.model)})


def state_dict(trained: inference.TrainedModel) -> dict[str, np.ndarray]:
    """The model's params and BatchNorm statistics under timm's names and layouts."""
    table, _ = _FAMILIES[type(trained.model)]
    values = tree_paths.flatten(nnx.state(trained.model, nnx.Any(nnx.Param, nnx.BatchStat)))
    return torch_names.to_torch({name: np.asarray(v, np.float32) for name, v in values.items()}, table)


def build(spec: TimmModel, weights_file: str):
    """`spec`'s timm model in eval mode with the weights of `weights_file` (strictly: every key used)."""
    import timm
    from safetensors.torch import load_file

    if not timm.is_model(spec.name):
        raise TimmExportError(f"timm {timm.__version__} has no model {spec.name!r}")
    model = timm.create_model(spec.name, pretrained=False, **spec.kwargs)
    model.load_state_dict(load_file(weights_file), strict=True)
    return model.eval()


def check(trained: inference.TrainedModel, spec: TimmModel, weights_file: str, height: int, width: int,
          tolerance: float) -> float:
    """Largest logit difference between timm with the written weights and the JAX model on random images."""
    import torch

    model = build(spec, weights_file)
    images = np.random.default_rng(0).integers(0, 256, (2, height, width, 3), dtype=np.uint8)
    normalised = (images.astype(np.float32) / 255.0 - np.asarray(trained.mean, np.float32)) / np.asarray(
        trained.std, np.float32)
    with torch.no_grad():
        got = model(torch.from_numpy(np.ascontiguousarray(normalised.transpose(0, 3, 1, 2)))).numpy()
    expected = trained.logits(images)
    difference = float(np.max(np.abs(got - expected)))
    if not difference <= tolerance * max(1.0, float(np.max(np.abs(expected)))):
        raise TimmExportError(f"timm's logits with the exported weights differ from the JAX model's by {difference:.3g}")
    return difference


def write(trained: inference.TrainedModel, out: str, height: int, width: int, tolerance: float) -> dict:
    """Write the state dict to `out` (checked in timm where it is installed); return what the sidecar adds."""
    try:
        from safetensors.numpy import save_file
    except ImportError:
        raise TimmExportError('--format timm writes .safetensors: pip install -e ".[timm]"') from None

    spec = timm_model(trained)
    tensors = state_dict(trained)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file(tensors, out)
    call = spec.call(os.path.abspath(out), trained.mean, trained.std, height, width)
    record = {"timm": {"model_name": spec.name, "kwargs": spec.kwargs, "create_model": call}}
    try:
        import timm  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return {**record, "checked": "not checked: torch and timm are not installed here"}
    try:
        record["checked_max_logit_difference"] = check(trained, spec, out, height, width, tolerance)
    except Exception:
        os.remove(out)
        raise
    return record
