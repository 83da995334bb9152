"""Vision Transformer (vit_{tiny,small,base,large}_patch{16,32}_{224,384}) in the timm layout.

Attribute names mirror timm (`cls_token`, `reg_token`, `pos_embed`, `blocks.i.{norm1,attn.qkv,attn.proj,norm2,
mlp.fc1,mlp.fc2}`, `norm` / `fc_norm`, `head`) so converted weights map one-to-one, except
timm's `patch_embed.proj` conv, which is `patch_embed` itself here. Numerics follow timm:
pre-norm blocks, LayerNorm eps 1e-6 (an option), exact-erf GELU, attention scale head_dim**-0.5.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxclf.kernels import xla_cpu
from jaxclf.models import layers
from jaxclf.models.base import Classifier, register

_init = nnx.initializers.truncated_normal(0.02)
# torch nn.Conv2d's default weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as in timm.
_patch_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _linear(din: int, dout: int, *, rngs: nnx.Rngs, dtype: Any) -> layers.Linear:
    """Linear with trunc-normal(0.02) kernel, zero bias, float32 params."""
    return layers.Linear(din, dout, kernel_init=_init, bias_init=nnx.initializers.zeros, dtype=dtype,
                         param_dtype=jnp.float32, rngs=rngs)


def _layer_norm(dim: int, eps: float, *, rngs: nnx.Rngs, dtype: Any) -> nnx.LayerNorm:
    """LayerNorm (timm's eps is 1e-6; Hugging Face's ViT uses 1e-12)."""
    return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def _dropout(rate: float, *, rngs: nnx.Rngs, broadcast_dims: tuple[int, ...] = ()) -> nnx.Dropout:
    """Dropout that holds an RNG stream only when it can drop anything (rate > 0)."""
    return nnx.Dropout(rate, broadcast_dims=broadcast_dims, rngs=rngs if rate > 0 else None)


class Attention(nnx.Module):
    """Multi-head self-attention with timm's fused qkv. x: [B, N, D] -> [B, N, D].

    With `sow_weights` set (jaxclf.explain does), each call sows its attention weights
    [B, heads, N, N] as `nnx.Intermediate` "weights" for `nnx.capture`.
    """

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype: Any):
        self.num_heads = num_heads
        self.sow_weights = False
        self.qkv = _linear(dim, 3 * dim, rngs=rngs, dtype=dtype)
        self.proj = _linear(dim, dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        # timm's qkv output is laid out as [3, heads, head_dim] along the feature axis.
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        if self.sow_weights:
            self.sow(nnx.Intermediate, "weights", layers.attention_weights(qkv).astype(jnp.float32))
        return self.proj(layers.attention(qkv).reshape(b, n, d))


class Mlp(nnx.Module):
    """fc1 -> exact GELU -> fc2. x: [B, N, D] -> [B, N, D]."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype: Any):
        self.fc1 = _linear(dim, hidden, rngs=rngs, dtype=dtype)
        self.fc2 = _linear(hidden, dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(layers.gelu(self.fc1(x)))


class Block(nnx.Module):
    """Pre-norm transformer block with stochastic depth. x: [B, N, D] -> [B, N, D]."""

    def __init__(self, dim: int, num_heads: int, drop_path: float, norm_eps: float, *, rngs: nnx.Rngs, dtype: Any):
        self.norm1 = _layer_norm(dim, norm_eps, rngs=rngs, dtype=dtype)
        self.attn = Attention(dim, num_heads, rngs=rngs, dtype=dtype)
        self.norm2 = _layer_norm(dim, norm_eps, rngs=rngs, dtype=dtype)
        self.mlp = Mlp(dim, 4 * dim, rngs=rngs, dtype=dtype)
        # Stochastic depth = dropout of a whole residual branch per example: one mask value per
        # example, broadcast over tokens and features, kept branches scaled by 1/(1-rate) as timm.
        self.drop_path1 = _dropout(drop_path, rngs=rngs, broadcast_dims=(1, 2))
        self.drop_path2 = _dropout(drop_path, rngs=rngs, broadcast_dims=(1, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class VisionTransformer(Classifier):
    """ViT classifier. images: float32[B, img_size, img_size, 3] -> logits: float32[B, num_classes].

    Tokens are [class token, register tokens, patches] (timm's order). `drop_rate` is dropout on
    the pooled features before the head (timm's `drop_rate`); `drop_path_rate` is the stochastic
    depth of the last block, linear from 0 at the first; `global_pool` is 'token' (class token
    after `norm`) or 'avg' (mean of the patch tokens, then `fc_norm`, as timm names it);
    `reg_tokens` adds that many register tokens (Darcet et al., 2023), learned, dropped before
    pooling; `no_embed_class` gives only the patches a position embedding (timm's register models);
    `norm_eps` is the LayerNorm epsilon; `pre_logits_size` > 0 adds the original ViT's
    representation layer (Dense + tanh, `pre_logits`) before the head, as in some vit_jax
    ImageNet-21k checkpoints.
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
        class_token: bool = True,
        reg_tokens: int = 0,
        no_embed_class: bool = False,
        global_pool: str = "token",
        norm_eps: float = 1e-6,
        pre_logits_size: int = 0,
    ):
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool={global_pool!r}: use 'token' or 'avg'")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True; use global_pool='avg'")
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of the patch size {patch_size}")
        self.img_size = img_size
        self.global_pool = global_pool
        self.has_class_token = class_token
        self.num_reg_tokens = reg_tokens
        self.num_prefix_tokens = int(class_token) + reg_tokens
        self.no_embed_class = no_embed_class
        num_patches = (img_size // patch_size) ** 2

        self.patch_embed = layers.Conv(
            3, width, (patch_size, patch_size), strides=(patch_size, patch_size), padding="VALID",
            kernel_init=_patch_init, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
        )
        if class_token:
            self.cls_token = nnx.Param(_init(rngs.params(), (1, 1, width), jnp.float32))
        if reg_tokens:
            self.reg_token = nnx.Param(_init(rngs.params(), (1, reg_tokens, width), jnp.float32))
        self.pos_embed = nnx.Param(
            _init(rngs.params(), (1, self.pos_embed_prefix_tokens() + num_patches, width), jnp.float32))
        self.blocks = nnx.List([
            Block(width, num_heads, float(rate), norm_eps, rngs=rngs, dtype=dtype)
            for rate in np.linspace(0.0, drop_path_rate, depth)
        ])
        if global_pool == "avg":
            self.fc_norm = _layer_norm(width, norm_eps, rngs=rngs, dtype=dtype)
        else:
            self.norm = _layer_norm(width, norm_eps, rngs=rngs, dtype=dtype)
        self.has_pre_logits = pre_logits_size > 0
        if self.has_pre_logits:
            self.pre_logits = _linear(width, pre_logits_size, rngs=rngs, dtype=jnp.float32)
        self.head_drop = _dropout(drop_rate, rngs=rngs)
        # The head runs in float32: it is cheap and its logits feed the float32 loss.
        self.head = _linear(pre_logits_size or width, num_classes, rngs=rngs, dtype=jnp.float32)

    def forward_features(self, images: jax.Array) -> jax.Array:
        """images -> tokens [B, prefix + patches, width] after the last block (and `norm`, as timm's)."""
        x = self._embed(images)
        for blk in self.blocks:
            x = blk(x)
        return x if self.global_pool == "avg" else self.norm(x)

    def forward_head(self, features: jax.Array) -> jax.Array:
        """tokens -> logits float32[B, num_classes]: the class token (or the patches' mean and `fc_norm`),
        the representation layer if any, dropout, head."""
        if self.global_pool == "avg":
            x = self.fc_norm(jnp.mean(features[:, self.num_prefix_tokens:], axis=1))
        else:
            x = features[:, 0]
        x = x.astype(jnp.float32)
        if self.has_pre_logits:
            x = jnp.tanh(self.pre_logits(x))
        return self.head(self.head_drop(x))

    def _embed(self, images: jax.Array) -> jax.Array:
        """images [B, img_size, img_size, 3] -> tokens [B, N, width]: prefix tokens, patches, position embedding."""
        if images.shape[1:3] != (self.img_size, self.img_size):
            raise ValueError(
                f"images are {images.shape[1]}x{images.shape[2]} but the model was built for "
                f"img_size={self.img_size}; create it with img_size={images.shape[1]}")
        x = self.patch_embed(images)
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)  # row-major patch order, as timm's flatten(2)
        pos_embed = self.pos_embed[...].astype(x.dtype)
        prefix = [jnp.broadcast_to(token[...].astype(x.dtype), (b, token.shape[1], d))
                  for token in (getattr(self, "cls_token", None), getattr(self, "reg_token", None)) if token is not None]
        if self.no_embed_class:
            return jnp.concatenate([*prefix, x + pos_embed], axis=1)
        return jnp.concatenate([*prefix, x], axis=1) + pos_embed

    def no_weight_decay(self) -> tuple[str, ...]:
        return ("pos_embed", "cls_token", "reg_token")

    def layer_id(self, path: str) -> int:
        parts = path.split("/")
        if parts[0] == "blocks":
            return int(parts[1]) + 1
        if parts[0] in ("patch_embed", "cls_token", "reg_token", "pos_embed"):
            return 0
        return len(self.blocks) + 1

    def pos_embed_prefix_tokens(self) -> int:
        return 0 if self.no_embed_class else self.num_prefix_tokens

    def xla_cpu_train_options(self) -> dict[str, Any]:
        return xla_cpu.VIT_TRAIN_OPTIONS


for _size, (_width, _depth, _heads) in {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}.items():
    for _patch in (16, 32):
        for _img in (224, 384):
            register(f"vit_{_size}_patch{_patch}_{_img}", VisionTransformer, width=_width, depth=_depth,
                     num_heads=_heads, patch_size=_patch, img_size=_img)
