"""ViT weights: timm state dicts, Hugging Face `ViTForImageClassification`, and the vit_jax /
big_vision `.npz` files (the AugReg and original ViT checkpoints)."""

from __future__ import annotations

import re

import numpy as np

from jaxclf.weights import torch_names
from jaxclf.weights.files import WeightsError

# timm's names are jaxclf's, except `patch_embed.proj`, which is `patch_embed` itself here.
TABLE = torch_names.NameTable("ViT", (torch_names.Module("patch_embed.proj", "patch_embed"),))

# transformers < 5 wrote these names; transformers 5 renames them the same way when loading.
_HF_V4_RENAMES = [
    (r"\.encoder\.layer\.", ".layers."),
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
]
# Hugging Face module paths -> timm's.
_HF_RENAMES = {
    r"^vit\.embeddings\.patch_embeddings\.projection$": "patch_embed.proj",
    r"^vit\.layers\.(\d+)\.attention\.o_proj$": r"blocks.\1.attn.proj",
    r"^vit\.layers\.(\d+)\.layernorm_before$": r"blocks.\1.norm1",
    r"^vit\.layers\.(\d+)\.layernorm_after$": r"blocks.\1.norm2",
    r"^vit\.layers\.(\d+)\.mlp\.": r"blocks.\1.mlp.",
    r"^vit\.layernorm$": "norm",
    r"^classifier$": "head",
}


def is_timm(tensors: dict) -> bool:
    return "patch_embed.proj.weight" in tensors


def is_hf(tensors: dict) -> bool:
    return "vit.embeddings.patch_embeddings.projection.weight" in tensors


def is_npz(tensors: dict) -> bool:
    return "embedding/kernel" in tensors and any(k.startswith("Transformer/") for k in tensors)


def from_timm(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """timm ViT state dict -> jaxclf params, through `TABLE`."""
    return torch_names.to_jaxclf(tensors, TABLE)


def from_hf(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF's separate q/k/v projections are fused into timm's qkv ([3, heads, head_dim] on the output axis)."""
    tensors = dict(tensors)
    for name in list(tensors):
        new = name
        for pattern, replacement in _HF_V4_RENAMES:
            new = re.sub(pattern, replacement, new)
        tensors[new] = tensors.pop(name)
    special = {
        "vit.embeddings.cls_token": "cls_token",
        "vit.embeddings.position_embeddings": "pos_embed",
    }
    renamed = {special.get(name, name): value for name, value in tensors.items()}
    for index in sorted({int(m[1]) for m in map(re.compile(r"^vit\.layers\.(\d+)\.attention\.q_proj\.").match, renamed) if m}):
        prefix = f"vit.layers.{index}.attention."
        for leaf in ("weight", "bias"):
            parts = [renamed.pop(f"{prefix}{p}_proj.{leaf}") for p in "qkv"]
            renamed[f"blocks.{index}.attn.qkv.{leaf}"] = np.concatenate(parts, axis=0)
    return torch_names.to_jaxclf(renamed, TABLE, _HF_RENAMES)


def from_npz(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """vit_jax names (`MultiHeadDotProductAttention_1`, `MlpBlock_3`, `LayerNorm_2`,
    `Transformer/posembed_input`) or big_vision's (`_0`, `_0`, `_1`, top-level `pos_embedding`,
    optionally one scanned `encoderblock` with a leading layer axis). big_vision adds the position
    embedding before the class token is prepended, which equals a zero position for the token."""
    big_vision = "pos_embedding" in tensors or "Transformer/encoderblock/LayerNorm_0/scale" in tensors
    mha, mlp, ln2 = ("MultiHeadDotProductAttention_0", "MlpBlock_0", "LayerNorm_1") if big_vision else (
        "MultiHeadDotProductAttention_1", "MlpBlock_3", "LayerNorm_2")
    get = _getter(tensors)
    out = {"patch_embed/kernel": get("embedding/kernel"), "patch_embed/bias": get("embedding/bias")}
    if "cls" in tensors:
        out["cls_token"] = get("cls")
    if big_vision:
        pos = get("pos_embedding")
        if "cls" in tensors:
            pos = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
    else:
        pos = get("Transformer/posembed_input/pos_embedding")
    out["pos_embed"] = pos
    for i, block in enumerate(_blocks(tensors)):
        b = f"blocks/{i}/"
        out[b + "norm1/scale"], out[b + "norm1/bias"] = block("LayerNorm_0/scale"), block("LayerNorm_0/bias")
        out[b + "norm2/scale"], out[b + "norm2/bias"] = block(f"{ln2}/scale"), block(f"{ln2}/bias")
        qkv = [block(f"{mha}/{n}/kernel") for n in ("query", "key", "value")]  # each [D, heads, head_dim]
        out[b + "attn/qkv/kernel"] = np.concatenate([k.reshape(k.shape[0], -1) for k in qkv], axis=1)
        out[b + "attn/qkv/bias"] = np.concatenate([block(f"{mha}/{n}/bias").reshape(-1) for n in ("query", "key", "value")])
        proj = block(f"{mha}/out/kernel")  # [heads, head_dim, D]
        out[b + "attn/proj/kernel"] = proj.reshape(-1, proj.shape[-1])
        out[b + "attn/proj/bias"] = block(f"{mha}/out/bias")
        for j in (1, 2):
            out[b + f"mlp/fc{j}/kernel"] = block(f"{mlp}/Dense_{j - 1}/kernel")
            out[b + f"mlp/fc{j}/bias"] = block(f"{mlp}/Dense_{j - 1}/bias")
    out["norm/scale"], out["norm/bias"] = get("Transformer/encoder_norm/scale"), get("Transformer/encoder_norm/bias")
    for name in ("pre_logits", "head"):
        if f"{name}/kernel" in tensors:
            out[f"{name}/kernel"], out[f"{name}/bias"] = get(f"{name}/kernel"), get(f"{name}/bias")
    return out


def npz_model_options(tensors: dict[str, np.ndarray]) -> dict:
    """Model options an npz implies: the pre-logits layer's size when it has one."""
    return {"pre_logits_size": int(tensors["pre_logits/bias"].shape[0])} if "pre_logits/bias" in tensors else {}


def _getter(tensors: dict[str, np.ndarray]):
    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise WeightsError(f"the npz file has no {name!r}; its keys start with {sorted(tensors)[:5]}")
        return tensors[name]
    return get


def _blocks(tensors: dict[str, np.ndarray]):
    """A getter per encoder block, for `encoderblock_{i}` names or one scanned `encoderblock`."""
    get = _getter(tensors)
    if "Transformer/encoderblock/LayerNorm_0/scale" in tensors:
        depth = tensors["Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
        return [lambda name, i=i: get(f"Transformer/encoderblock/{name}")[i] for i in range(depth)]
    depth = len({m[1] for m in map(re.compile(r"^Transformer/encoderblock_(\d+)/").match, tensors) if m})
    return [lambda name, i=i: get(f"Transformer/encoderblock_{i}/{name}") for i in range(depth)]
