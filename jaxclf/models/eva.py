"""EVA-02 (eva02_{tiny,small,base}_patch14_224) in timm's layout: a ViT whose blocks rotate queries and keys
by their patch position (rotary embedding), gate the MLP with SiLU (SwiGLU) and, in the base model, normalise
inside the MLP (sub-LayerNorm) and project q, k, v separately.

Everything outside the blocks is `vit.VisionTransformer` (class token, learned position embedding, average
pooling with `fc_norm`). Names follow timm's `Eva`: `blocks.i.attn.{qkv,q_bias,v_bias}` (fused, no key bias)
or `blocks.i.attn.{q_proj,k_proj,v_proj}`, `blocks.i.mlp.{fc1,fc2}` (packed SwiGLU) or
`blocks.i.mlp.{fc1_g,fc1_x,norm,fc2}`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxclf.models import initializers, layers
from jaxclf.models.base import register, remat_block
from jaxclf.models.vit import VisionTransformer, _dropout, _layer_norm, _linear

# EVA-02's rotary grid is the 224 px pretraining grid (16 x 16 patches of 14): other resolutions
# stretch their patch positions onto it (timm's `ref_feat_shape`).
REF_GRID = 16


def rotary_sin_cos(grid: int, head_dim: int, ref_grid: int = REF_GRID, temperature: float = 10000.0):
    """(sin, cos), each float32[grid * grid, head_dim], of timm's `RotaryEmbeddingCat` (in_pixels=False):
    a quarter of head_dim frequencies per axis, row then column, each value repeated for a pair of channels."""
    num_bands = head_dim // 4
    bands = 1.0 / temperature ** (np.arange(num_bands, dtype=np.float32) / np.float32(num_bands))
    coords = np.arange(grid, dtype=np.float32) / np.float32(grid) * np.float32(ref_grid)
    rows, cols = np.meshgrid(coords, coords, indexing="ij")
    angles = np.stack([rows, cols], axis=-1)[..., None] * bands  # [grid, grid, 2, num_bands]
    angles = angles.reshape(grid * grid, 2 * num_bands).repeat(2, axis=-1)
    return np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)


def apply_rotary(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotate each channel pair (x0, x1) of x [B, N, heads, head_dim] by its position's angle:
    x * cos + (-x1, x0) * sin, in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    rotated = jnp.stack([-x32[..., 1::2], x32[..., 0::2]], axis=-1).reshape(x.shape)
    return (x32 * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)


class EvaAttention(nnx.Module):
    """Self-attention with rotary position on the patch tokens (prefix tokens unrotated). x: [B, N, D] -> [B, N, D].

    Sows its weights as `vit.Attention` does when `sow_weights` is set (attention rollout)."""

    def __init__(self, dim: int, num_heads: int, qkv_fused: bool, *, rngs: nnx.Rngs, dtype: Any):
        self.num_heads = num_heads
        self.qkv_fused = qkv_fused
        self.sow_weights = False
        if qkv_fused:
            self.qkv = layers.Linear(dim, 3 * dim, use_bias=False, kernel_init=initializers.truncated_normal(0.02),
                                     dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
            self.q_bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
            self.v_bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        else:
            self.q_proj = _linear(dim, dim, rngs=rngs, dtype=dtype)
            self.k_proj = layers.Linear(dim, dim, use_bias=False, kernel_init=initializers.truncated_normal(0.02),
                                        dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
            self.v_proj = _linear(dim, dim, rngs=rngs, dtype=dtype)
        self.proj = _linear(dim, dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array, num_prefix_tokens: int) -> jax.Array:
        b, n, d = x.shape
        if self.qkv_fused:
            bias = jnp.concatenate([self.q_bias[...], jnp.zeros_like(self.q_bias[...]), self.v_bias[...]])
            qkv = self.qkv(x) + bias.astype(x.dtype)
        else:
            qkv = jnp.concatenate([self.q_proj(x), self.k_proj(x), self.v_proj(x)], axis=-1)
        q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, self.num_heads, d // self.num_heads), 2, 0)
        rotate = lambda t: jnp.concatenate(
            [t[:, :num_prefix_tokens], apply_rotary(t[:, num_prefix_tokens:], sin, cos)], axis=1)
        qkv = jnp.stack([rotate(q), rotate(k), v], axis=2)
        if self.sow_weights:
            self.sow(nnx.Intermediate, "weights", layers.attention_weights(qkv).astype(jnp.float32))
        return self.proj(layers.attention(qkv).reshape(b, n, d))


class SwiGLU(nnx.Module):
    """silu(gate) * value -> [LayerNorm] -> fc2. x: [B, N, D] -> [B, N, D]. Without `sub_ln` one `fc1` holds the
    gate then the value (timm's GluMlp); with it `fc1_g`, `fc1_x` and a `norm` before `fc2` (timm's SwiGLU)."""

    def __init__(self, dim: int, hidden: int, sub_ln: bool, norm_eps: float, *, rngs: nnx.Rngs, dtype: Any):
        self.sub_ln = sub_ln
        if sub_ln:
            self.fc1_g = _linear(dim, hidden, rngs=rngs, dtype=dtype)
            self.fc1_x = _linear(dim, hidden, rngs=rngs, dtype=dtype)
            self.norm = _layer_norm(hidden, norm_eps, rngs=rngs, dtype=dtype)
        else:
            self.fc1 = _linear(dim, 2 * hidden, rngs=rngs, dtype=dtype)
        self.fc2 = _linear(hidden, dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.sub_ln:
            return self.fc2(self.norm(jax.nn.silu(self.fc1_g(x)) * self.fc1_x(x)))
        gate, value = jnp.split(self.fc1(x), 2, axis=-1)
        return self.fc2(jax.nn.silu(gate) * value)


class EvaBlock(nnx.Module):
    """Pre-norm block of rotary attention and SwiGLU MLP with stochastic depth. x: [B, N, D] -> [B, N, D]."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, drop_path: float, norm_eps: float, *,
                 qkv_fused: bool, sub_ln: bool, rngs: nnx.Rngs, dtype: Any):
        self.norm1 = _layer_norm(dim, norm_eps, rngs=rngs, dtype=dtype)
        self.attn = EvaAttention(dim, num_heads, qkv_fused, rngs=rngs, dtype=dtype)
        self.norm2 = _layer_norm(dim, norm_eps, rngs=rngs, dtype=dtype)
        self.mlp = SwiGLU(dim, mlp_hidden, sub_ln, norm_eps, rngs=rngs, dtype=dtype)
        self.drop_path1 = _dropout(drop_path, rngs=rngs, broadcast_dims=(1, 2))
        self.drop_path2 = _dropout(drop_path, rngs=rngs, broadcast_dims=(1, 2))

    @remat_block
    def __call__(self, x: jax.Array, sin: jax.Array, cos: jax.Array, num_prefix_tokens: int) -> jax.Array:
        x = x + self.drop_path1(self.attn(self.norm1(x), sin, cos, num_prefix_tokens))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class Eva(VisionTransformer):
    """EVA-02 classifier. images: float32[B, img_size, img_size, 3] -> logits: float32[B, num_classes].

    `global_pool` is 'avg' (EVA-02's, with `fc_norm`), 'token' or 'map' as in `VisionTransformer`.
    `qkv_fused` (tiny, small) holds q, k, v in one `qkv` with `q_bias`/`v_bias`; `sub_ln` (base) adds the
    LayerNorm inside the MLP. The rotary angles follow the image size (stretched onto the 16 x 16 grid of
    pretraining, as timm's `ref_feat_shape`), so only the learned `pos_embed` needs resampling at load.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        patch_size: int,
        width: int,
        depth: int,
        num_heads: int,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        img_size: int = 224,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        mlp_ratio: float = 4 * 2 / 3,
        qkv_fused: bool = True,
        sub_ln: bool = False,
        global_pool: str = "avg",
        norm_eps: float = 1e-6,
    ):
        self.qkv_fused = qkv_fused
        self.sub_ln = sub_ln
        super().__init__(num_classes=num_classes, patch_size=patch_size, width=width, depth=depth, num_heads=num_heads,
                         rngs=rngs, dtype=dtype, img_size=img_size, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
                         global_pool=global_pool, norm_eps=norm_eps, mlp_ratio=mlp_ratio)

    def _block(self, width: int, num_heads: int, mlp_hidden: int, drop_path: float, norm_eps: float, *,
               init_values: float, act: str, rngs: nnx.Rngs, dtype: Any) -> nnx.Module:
        return EvaBlock(width, num_heads, mlp_hidden, drop_path, norm_eps, qkv_fused=self.qkv_fused,
                        sub_ln=self.sub_ln, rngs=rngs, dtype=dtype)

    def _run_blocks(self, x: jax.Array, grid: int) -> jax.Array:
        sin, cos = rotary_sin_cos(grid, x.shape[-1] // self.blocks[0].attn.num_heads)
        for blk in self.blocks:
            x = blk(x, jnp.asarray(sin), jnp.asarray(cos), self.num_prefix_tokens)
        return x


for _size, (_width, _depth, _heads) in {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}.items():
    register(f"eva02_{_size}_patch14_224", Eva, width=_width, depth=_depth, num_heads=_heads, patch_size=14,
             **({"qkv_fused": False, "sub_ln": True} if _size == "base" else {}))
