"""Vision Transformer in the timm layout: the 2020-21 ViTs (vit_{tiny,small,base,large}_patch{16,32}_{224,384})
and today's backbones built from the same blocks, DINOv2 (`vit_*_patch14_dinov2`, `_reg4_`: layer scale,
registers), SigLIP image towers (`vit_*_siglip_*`: attention-pool "map" head) and CLIP image towers
(`vit_*_clip_*`: `norm_pre`, QuickGELU in the OpenAI variants).

Attribute names mirror timm (`cls_token`, `reg_token`, `pos_embed`, `norm_pre`, `blocks.i.{norm1,attn.qkv,
attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}`, `norm` / `fc_norm`, `attn_pool`, `head`) so converted
weights map one-to-one, except timm's `patch_embed.proj` conv, which is `patch_embed` itself here. Numerics
follow timm: pre-norm blocks, LayerNorm eps 1e-6 (an option), exact-erf GELU (an option), attention scale
head_dim**-0.5. A model is built for one `img_size`; fine-tuning at another resolution resamples the position
embedding when the weights are loaded (`weights.surgery`), not at run time.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxclf.kernels import xla_cpu
from jaxclf.models import initializers, layers
from jaxclf.models.base import Classifier, register, remat_block

_init = initializers.truncated_normal(0.02)
# torch nn.Conv2d's default weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as in timm.
_patch_init = initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _linear(din: int, dout: int, *, rngs: nnx.Rngs, dtype: Any) -> layers.Linear:
    """Linear with trunc-normal(0.02) kernel, zero bias, float32 params."""
    return layers.Linear(din, dout, kernel_init=_init, bias_init=nnx.initializers.zeros, dtype=dtype,
                         param_dtype=jnp.float32, rngs=rngs)


def _layer_norm(dim: int, eps: float, *, rngs: nnx.Rngs, dtype: Any) -> nnx.LayerNorm:
    """LayerNorm (timm's eps is 1e-6; Hugging Face's ViT uses 1e-12)."""
    return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def quick_gelu(x: jax.Array) -> jax.Array:
    """x * sigmoid(1.702 x), the GELU approximation OpenAI's CLIP was trained with."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """The tanh approximation of GELU (torch's `GELU(approximate="tanh")`, big_vision's default)."""
    return jax.nn.gelu(x, approximate=True)


# `act` option -> activation of the MLPs (timm's act_layer names; transformers calls gelu_tanh
# "gelu_pytorch_tanh").
ACTIVATIONS = {"gelu": layers.gelu, "gelu_tanh": gelu_tanh, "quick_gelu": quick_gelu}


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
    """fc1 -> activation (`ACTIVATIONS[act]`) -> fc2. x: [B, N, D] -> [B, N, D]."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype: Any, act: str = "gelu"):
        self.act = act
        self.fc1 = _linear(dim, hidden, rngs=rngs, dtype=dtype)
        self.fc2 = _linear(hidden, dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class LayerScale(nnx.Module):
    """x * gamma, a learned per-channel scale of a residual branch (CaiT; DINOv2 starts it at 1e-5)."""

    def __init__(self, dim: int, init_value: float):
        self.gamma = nnx.Param(jnp.full((dim,), init_value, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...].astype(x.dtype)


def _residual_scale(dim: int, init_values: float) -> LayerScale | None:
    return LayerScale(dim, init_values) if init_values else None


class Block(nnx.Module):
    """Pre-norm transformer block with stochastic depth and, with `init_values` > 0, layer scale
    (`ls1`, `ls2`). x: [B, N, D] -> [B, N, D]."""

    def __init__(self, dim: int, num_heads: int, drop_path: float, norm_eps: float, *, rngs: nnx.Rngs, dtype: Any,
                 mlp_hidden: int | None = None, init_values: float = 0.0, act: str = "gelu"):
        self.norm1 = _layer_norm(dim, norm_eps, rngs=rngs, dtype=dtype)
        self.attn = Attention(dim, num_heads, rngs=rngs, dtype=dtype)
        self.ls1 = nnx.data(_residual_scale(dim, init_values))
        self.norm2 = _layer_norm(dim, norm_eps, rngs=rngs, dtype=dtype)
        self.mlp = Mlp(dim, mlp_hidden or 4 * dim, rngs=rngs, dtype=dtype, act=act)
        self.ls2 = nnx.data(_residual_scale(dim, init_values))
        # Stochastic depth = dropout of a whole residual branch per example: one mask value per
        # example, broadcast over tokens and features, kept branches scaled by 1/(1-rate) as timm.
        self.drop_path1 = _dropout(drop_path, rngs=rngs, broadcast_dims=(1, 2))
        self.drop_path2 = _dropout(drop_path, rngs=rngs, broadcast_dims=(1, 2))

    @remat_block
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.drop_path1(_scaled(self.ls1, self.attn(self.norm1(x))))
        return x + self.drop_path2(_scaled(self.ls2, self.mlp(self.norm2(x))))


def _scaled(scale: LayerScale | None, x: jax.Array) -> jax.Array:
    return x if scale is None else scale(x)


class AttentionPool(nnx.Module):
    """timm's `AttentionPoolLatent` (SigLIP's "map" head): one learned query attends over the tokens,
    then a residual MLP. tokens [B, N, D] -> pooled [B, D].

    `kv` holds keys then values on its output axis, each laid out [heads, head_dim] as timm's."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, norm_eps: float, *, rngs: nnx.Rngs, dtype: Any,
                 act: str = "gelu"):
        self.num_heads = num_heads
        self.latent = nnx.Param(initializers.truncated_normal(dim**-0.5)(rngs.params(), (1, 1, dim), jnp.float32))
        self.q = _linear(dim, dim, rngs=rngs, dtype=dtype)
        self.kv = _linear(dim, 2 * dim, rngs=rngs, dtype=dtype)
        self.proj = _linear(dim, dim, rngs=rngs, dtype=dtype)
        self.norm = _layer_norm(dim, norm_eps, rngs=rngs, dtype=dtype)
        self.mlp = Mlp(dim, mlp_hidden, rngs=rngs, dtype=dtype, act=act)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        heads, head_dim = self.num_heads, d // self.num_heads
        q = self.q(self.latent[...].astype(x.dtype)).reshape(1, heads, head_dim)
        k, v = jnp.moveaxis(self.kv(x).reshape(b, n, 2, heads, head_dim), 2, 0)
        logits = jnp.einsum("qhd,bnhd->bhn", q, k, preferred_element_type=jnp.float32) * head_dim**-0.5
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        x = self.proj(jnp.einsum("bhn,bnhd->bhd", weights, v).reshape(b, d))
        return x + self.mlp(self.norm(x))


class VisionTransformer(Classifier):
    """ViT classifier. images: float32[B, img_size, img_size, 3] -> logits: float32[B, num_classes].

    Tokens are [class token, register tokens, patches] (timm's order). `drop_rate` is dropout on
    the pooled features before the head (timm's `drop_rate`); `drop_path_rate` is the stochastic
    depth of the last block, linear from 0 at the first; `global_pool` is 'token' (class token
    after `norm`), 'avg' (mean of the patch tokens, then `fc_norm`, as timm names it) or 'map'
    (`attn_pool`, attention pooling of the patch tokens after `norm`, SigLIP's head);
    `reg_tokens` adds that many register tokens (Darcet et al., 2023), learned, dropped before
    pooling; `no_embed_class` gives only the patches a position embedding (timm's register models);
    `norm_eps` is the LayerNorm epsilon; `mlp_ratio` sets the MLP width; `init_values` > 0 adds layer
    scale starting at that value (DINOv2); `pre_norm` adds `norm_pre` before the blocks and drops the
    patch embedding's bias (CLIP); `act` picks the MLPs' activation (`ACTIVATIONS`); `pre_logits_size`
    > 0 adds the original ViT's representation layer (Dense + tanh, `pre_logits`) before the head, as
    in some vit_jax ImageNet-21k checkpoints.
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
        mlp_ratio: float = 4.0,
        init_values: float = 0.0,
        pre_norm: bool = False,
        act: str = "gelu",
        pre_logits_size: int = 0,
    ):
        if global_pool not in ("token", "avg", "map"):
            raise ValueError(f"global_pool={global_pool!r}: use 'token', 'avg' or 'map'")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True; use global_pool='avg' or 'map'")
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of the patch size {patch_size}")
        if act not in ACTIVATIONS:
            raise ValueError(f"act={act!r}: use one of {', '.join(ACTIVATIONS)}")
        self.img_size = img_size
        self.global_pool = global_pool
        self.has_class_token = class_token
        self.num_reg_tokens = reg_tokens
        self.num_prefix_tokens = int(class_token) + reg_tokens
        self.no_embed_class = no_embed_class
        self.pre_norm = pre_norm
        self.patch_size = patch_size
        num_patches = (img_size // patch_size) ** 2
        mlp_hidden = int(width * mlp_ratio)

        self.patch_embed = layers.Conv(
            3, width, (patch_size, patch_size), strides=(patch_size, patch_size), padding="VALID", use_bias=not pre_norm,
            kernel_init=_patch_init, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
        )
        if class_token:
            self.cls_token = nnx.Param(_init(rngs.params(), (1, 1, width), jnp.float32))
        if reg_tokens:
            self.reg_token = nnx.Param(_init(rngs.params(), (1, reg_tokens, width), jnp.float32))
        self.pos_embed = nnx.Param(
            _init(rngs.params(), (1, self.pos_embed_prefix_tokens() + num_patches, width), jnp.float32))
        if pre_norm:
            self.norm_pre = _layer_norm(width, norm_eps, rngs=rngs, dtype=dtype)
        self.blocks = nnx.List([
            self._block(width, num_heads, mlp_hidden, float(rate), norm_eps, init_values=init_values, act=act,
                        rngs=rngs, dtype=dtype)
            for rate in np.linspace(0.0, drop_path_rate, depth)
        ])
        if global_pool == "avg":
            self.fc_norm = _layer_norm(width, norm_eps, rngs=rngs, dtype=dtype)
        else:
            self.norm = _layer_norm(width, norm_eps, rngs=rngs, dtype=dtype)
        if global_pool == "map":
            self.attn_pool = AttentionPool(width, num_heads, mlp_hidden, norm_eps, rngs=rngs, dtype=dtype, act=act)
        self.has_pre_logits = pre_logits_size > 0
        if self.has_pre_logits:
            self.pre_logits = _linear(width, pre_logits_size, rngs=rngs, dtype=jnp.float32)
        self.head_drop = _dropout(drop_rate, rngs=rngs)
        # The head runs in float32: it is cheap and its logits feed the float32 loss.
        self.head = _linear(pre_logits_size or width, num_classes, rngs=rngs, dtype=jnp.float32)

    def _block(self, width: int, num_heads: int, mlp_hidden: int, drop_path: float, norm_eps: float, *,
               init_values: float, act: str, rngs: nnx.Rngs, dtype: Any) -> nnx.Module:
        """One transformer block (a subclass with another block overrides this and `_run_blocks`)."""
        return Block(width, num_heads, drop_path, norm_eps, mlp_hidden=mlp_hidden, init_values=init_values, act=act,
                     rngs=rngs, dtype=dtype)

    def forward_features(self, images: jax.Array) -> jax.Array:
        """images [B, img_size, img_size, 3] -> tokens [B, prefix + patches, width] after the final norm
        (timm's `forward_features`; with global_pool='avg' the norm comes after pooling, as `fc_norm`)."""
        x = self._embed(images)
        if self.pre_norm:
            x = self.norm_pre(x)
        x = self._run_blocks(x, images.shape[1] // self.patch_size)
        return x if self.global_pool == "avg" else self.norm(x)

    def _run_blocks(self, x: jax.Array, grid: int) -> jax.Array:
        """tokens [B, N, D] through the blocks; `grid` is the patch grid's side."""
        for blk in self.blocks:
            x = blk(x)
        return x

    def pooled_features(self, features: jax.Array) -> jax.Array:
        """tokens [B, N, width] -> the head's input float32[B, width] (timm's `forward_head(pre_logits=True)`)."""
        if self.global_pool == "avg":
            x = self.fc_norm(jnp.mean(features[:, self.num_prefix_tokens:], axis=1))
        elif self.global_pool == "map":
            x = self.attn_pool(features[:, self.num_prefix_tokens:])
        else:
            x = features[:, 0]
        x = x.astype(jnp.float32)
        return jnp.tanh(self.pre_logits(x)) if self.has_pre_logits else x

    def forward_head(self, features: jax.Array) -> jax.Array:
        """tokens [B, N, width] (`forward_features`) -> logits float32[B, num_classes]."""
        return self.head(self.head_drop(self.pooled_features(features)))

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
        if parts[0] in ("patch_embed", "cls_token", "reg_token", "pos_embed", "norm_pre"):
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


# Today's backbones, each as timm 1.0.31 registers it (sizes, image size of the pretrained weights).
_DINOV2_SIZES = {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
for _size, (_width, _depth, _heads) in _DINOV2_SIZES.items():
    register(f"vit_{_size}_patch14_dinov2", VisionTransformer, width=_width, depth=_depth, num_heads=_heads,
             patch_size=14, img_size=518, init_values=1e-5)
    register(f"vit_{_size}_patch14_reg4_dinov2", VisionTransformer, width=_width, depth=_depth, num_heads=_heads,
             patch_size=14, img_size=518, init_values=1e-5, reg_tokens=4, no_embed_class=True)
for _img in (224, 256, 384):
    register(f"vit_base_patch16_siglip_{_img}", VisionTransformer, width=768, depth=12, num_heads=12, patch_size=16,
             img_size=_img, class_token=False, global_pool="map")
register("vit_so400m_patch14_siglip_224", VisionTransformer, width=1152, depth=27, num_heads=16, patch_size=14,
         img_size=224, mlp_ratio=3.7362, class_token=False, global_pool="map")
for _name, (_width, _depth, _heads, _patch) in {"base_patch16": (768, 12, 12, 16),
                                                 "large_patch14": (1024, 24, 16, 14)}.items():
    for _suffix, _act in (("clip", "gelu"), ("clip_quickgelu", "quick_gelu")):
        register(f"vit_{_name}_{_suffix}_224", VisionTransformer, width=_width, depth=_depth, num_heads=_heads,
                 patch_size=_patch, img_size=224, pre_norm=True, norm_eps=1e-5, act=_act)
