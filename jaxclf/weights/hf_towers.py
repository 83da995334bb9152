"""Hugging Face transformers image towers -> jaxclf ViT params: `Dinov2Model`, `SiglipVisionModel` and
`CLIPVisionModel` (or the `vision_model.` half of a whole `SiglipModel` / `CLIPModel` checkpoint).

Each is renamed to timm's names first (`blocks.N.attn.qkv`, `ls1.gamma`, `attn_pool.kv`, `norm_pre`, ...)
and then read through the ViT name table, so one table serves timm and transformers. None of them has
a classifier: loading gives a new zero-initialised head (`weights.surgery`).
"""

from __future__ import annotations

import re

import numpy as np

from jaxclf.weights import torch_names, vit
from jaxclf.weights.files import WeightsError

# A whole image-text checkpoint keeps its image tower under this prefix; the rest is the text side.
_VISION_PREFIX = "vision_model."
# Only in the image-text checkpoints, or (the mask token) only used for masked pretraining.
_IGNORED = re.compile(r"^(text_model\.|text_projection|visual_projection|logit_scale|logit_bias|embeddings\.mask_token$)")

# Dinov2Model: transformers 4 names (still what save_pretrained writes) and transformers 5 names.
_DINOV2_RENAMES = {
    r"^embeddings\.patch_embeddings\.projection$": "patch_embed.proj",
    r"^encoder\.layer\.(\d+)\.attention\.(?:output\.dense|o_proj)$": r"blocks.\1.attn.proj",
    r"^encoder\.layer\.(\d+)\.": r"blocks.\1.",
    r"^layernorm$": "norm",
}
_DINOV2_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.(attention\.query|attention\.key|attention\.value|"
                         r"q_proj|k_proj|v_proj)\.(weight|bias)$")
# SiglipVisionModel / CLIPVisionModel (shared encoder names).
_TOWER_RENAMES = {
    r"^embeddings\.patch_embedding$": "patch_embed.proj",
    r"^pre_layrnorm$": "norm_pre",
    r"^encoder\.layers\.(\d+)\.self_attn\.out_proj$": r"blocks.\1.attn.proj",
    r"^encoder\.layers\.(\d+)\.layer_norm(\d)$": r"blocks.\1.norm\2",
    r"^encoder\.layers\.(\d+)\.mlp\.": r"blocks.\1.mlp.",
    r"^post_layernorm$": "norm",
    r"^head\.attention\.out_proj$": "attn_pool.proj",
    r"^head\.layernorm$": "attn_pool.norm",
    r"^head\.mlp\.": "attn_pool.mlp.",
}
_TOWER_QKV = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)$")
_QKV_ORDER = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "attention.query": 0, "attention.key": 1, "attention.value": 2}


def _vision_tensors(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The image tower's tensors, without the `vision_model.` prefix and the text side."""
    out = {}
    for name, value in tensors.items():
        name = name[len(_VISION_PREFIX):] if name.startswith(_VISION_PREFIX) else name
        if not _IGNORED.match(name):
            out[name] = value
    return out


def is_dinov2(tensors: dict) -> bool:
    return "embeddings.patch_embeddings.projection.weight" in tensors and "embeddings.mask_token" in tensors


def is_siglip(tensors: dict) -> bool:
    names = _vision_tensors(tensors)
    return "embeddings.patch_embedding.weight" in names and "embeddings.class_embedding" not in names


def is_clip(tensors: dict) -> bool:
    return "embeddings.class_embedding" in _vision_tensors(tensors)


def _fuse_qkv(tensors: dict[str, np.ndarray], pattern: re.Pattern) -> dict[str, np.ndarray]:
    """The separate q, k, v projections `pattern` matches (groups: block index, projection, leaf) fused
    into timm's `blocks.N.attn.qkv` ([3, heads, head_dim] on the output axis)."""
    out, parts = {}, {}
    for name, value in tensors.items():
        found = pattern.match(name)
        if found:
            parts.setdefault((int(found[1]), found[3]), {})[_QKV_ORDER[found[2]]] = value
        else:
            out[name] = value
    for (index, leaf), qkv in parts.items():
        if len(qkv) != 3:
            raise WeightsError(f"block {index}: the weights hold only {len(qkv)} of the q, k, v projections' {leaf}")
        out[f"blocks.{index}.attn.qkv.{leaf}"] = np.concatenate([qkv[i] for i in range(3)], axis=0)
    return out


def from_dinov2(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers `Dinov2Model` -> jaxclf params of `vit_*_patch14_dinov2`."""
    tensors = _fuse_qkv(_vision_tensors(tensors), _DINOV2_QKV)
    special = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed"}
    renamed = {}
    for name, value in tensors.items():
        scale = re.match(r"^encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1$", name)
        renamed[f"blocks.{scale[1]}.ls{scale[2]}.gamma" if scale else special.get(name, name)] = value
    return torch_names.to_jaxclf(renamed, vit.TABLE, _DINOV2_RENAMES)


def from_siglip(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers `SiglipVisionModel` -> jaxclf params of `vit_*_siglip_*`; the pooling head's
    `nn.MultiheadAttention` in-projection splits into timm's `attn_pool.q` and `attn_pool.kv`."""
    tensors = _fuse_qkv(_vision_tensors(tensors), _TOWER_QKV)
    renamed = {"pos_embed": tensors.pop("embeddings.position_embedding.weight")[None]}
    if "head.probe" in tensors:
        renamed["attn_pool.latent"] = tensors.pop("head.probe")
        for leaf in ("weight", "bias"):
            in_proj = tensors.pop(f"head.attention.in_proj_{leaf}")
            dim = in_proj.shape[0] // 3
            renamed[f"attn_pool.q.{leaf}"], renamed[f"attn_pool.kv.{leaf}"] = in_proj[:dim], in_proj[dim:]
    renamed.update(tensors)
    return torch_names.to_jaxclf(renamed, vit.TABLE, _TOWER_RENAMES)


def from_clip(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers `CLIPVisionModel` -> jaxclf params of `vit_*_clip_*` (`post_layernorm`, applied to the
    class token there, is `norm` here, applied to every token: the pooled features are the same)."""
    tensors = _fuse_qkv(_vision_tensors(tensors), _TOWER_QKV)
    renamed = {"cls_token": tensors.pop("embeddings.class_embedding")[None, None],
               "pos_embed": tensors.pop("embeddings.position_embedding.weight")[None]}
    renamed.update(tensors)
    return torch_names.to_jaxclf(renamed, vit.TABLE, _TOWER_RENAMES)


_SIZES = {384: "small", 768: "base", 1024: "large", 1152: "so400m"}
_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}


def _vision_config(config: dict) -> dict:
    """The image tower's part of a transformers config (a whole SigLIP / CLIP config nests it)."""
    return config.get("vision_config") or config


def model_name(config: dict) -> str:
    """The jaxclf model a transformers Dinov2 / SigLIP / CLIP config describes ('' for another one)."""
    kind, vision = config.get("model_type", ""), _vision_config(config)
    size, patch = _SIZES.get(vision.get("hidden_size")), vision.get("patch_size")
    if size is None:
        return ""
    if kind == "dinov2":
        return f"vit_{size}_patch14_dinov2"
    if kind in ("siglip", "siglip_vision_model"):
        return "vit_so400m_patch14_siglip_224" if size == "so400m" else f"vit_{size}_patch{patch}_siglip_224"
    if kind in ("clip", "clip_vision_model"):
        quick = "_quickgelu" if vision.get("hidden_act") == "quick_gelu" else ""
        return f"vit_{size}_patch{patch}_clip{quick}_224"
    return ""


def model_options(config: dict) -> dict:
    """Options a transformers Dinov2 / SigLIP / CLIP config implies: LayerNorm epsilon and activation."""
    if not model_name(config):
        return {}
    vision = _vision_config(config)
    options = {"norm_eps": vision.get("layer_norm_eps", 1e-6)}
    act = vision.get("hidden_act", "gelu")
    if act not in _HF_ACTIVATIONS:
        raise WeightsError(f"config.json: hidden_act={act!r} has no jaxclf counterpart ({', '.join(_HF_ACTIVATIONS)})")
    return {**options, "act": _HF_ACTIVATIONS[act]}
