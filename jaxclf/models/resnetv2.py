"""BiT ResNetV2 (resnetv2_{50x1,50x3,101x1,101x3,152x2,152x4}_bit) in the timm layout.

Pre-activation bottlenecks with weight-standardised convs and GroupNorm(32), as timm's
`resnetv2_*_bit` models. Attribute names mirror timm (`stem.conv`, `stages.i.blocks.j.{norm1,
conv1, norm2, conv2, norm3, conv3, downsample.conv}`, `norm`, `head.fc`) so converted weights map
one-to-one; timm's 1x1-conv head is a Linear here. Padding is explicit and symmetric like
PyTorch's, and the stem pool pads with zeros like timm's 'fixed' stem, never XLA 'SAME'.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxclf.models import initializers, layers
from jaxclf.models.base import Classifier, register, remat_block

# timm's _init_weights: kaiming_normal_(mode="fan_out", nonlinearity="relu") for convs...
_conv_init = initializers.variance_scaling(2.0, "fan_out", "normal")
# ...and normal(std=0.01) with a zero bias for the classifier.
_head_init = initializers.normal(0.01)
# timm's BiT models build StdConv2d with eps=1e-8 (its class default is 1e-6).
_STD_CONV_EPS = 1e-8


class StdConv(nnx.Module):
    """Bias-free conv with weight standardisation (timm `StdConv2d`). x: [B, H, W, cin] -> [B, H', W', cout].

    Every call standardises each output channel's kernel over (h, w, in) in float32, with the
    biased variance and eps 1e-8 as timm, and pads like timm's `get_padding` on every side.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, *, rngs: nnx.Rngs, dtype: Any):
        self.kernel = nnx.Param(_conv_init(rngs.params(), (kernel, kernel, cin, cout), jnp.float32))
        self.strides = (stride, stride)
        pad = (stride - 1 + kernel - 1) // 2
        self.padding = ((pad, pad), (pad, pad))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(jnp.float32)
        mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
        var = jnp.var(kernel, axis=(0, 1, 2), keepdims=True)
        kernel = ((kernel - mean) * jax.lax.rsqrt(var + _STD_CONV_EPS)).astype(self.dtype)
        return layers.conv(x.astype(self.dtype), kernel, self.strides, self.padding)


def _group_norm(features: int, *, rngs: nnx.Rngs, dtype: Any) -> nnx.GroupNorm:
    """GroupNorm(32) with torch's eps and two-pass variance (statistics in float32)."""
    return nnx.GroupNorm(features, num_groups=32, epsilon=1e-5, use_fast_variance=False,
                         dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class Stem(nnx.Module):
    """7x7/2 std conv, then the 3x3/2 max pool. images: [B, H, W, 3] -> [B, H/4, W/4, width].

    The pool pads with zeros, not -inf, as timm's 'fixed' BiT stem: the stem conv's output is not
    post-ReLU, so border windows that are all negative pool to 0.
    """

    def __init__(self, width: int, *, rngs: nnx.Rngs, dtype: Any):
        self.conv = StdConv(3, width, 7, 2, rngs=rngs, dtype=dtype)

    def __call__(self, images: jax.Array) -> jax.Array:
        return layers.max_pool_3x3_s2(self.conv(images), pad_value=0.0)


class Projection(nnx.Module):
    """Shortcut of a stage's first block: strided 1x1 std conv of the pre-activated input (timm `DownsampleConv`)."""

    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs, dtype: Any):
        self.conv = StdConv(cin, cout, 1, stride, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class PreActBottleneck(nnx.Module):
    """norm-ReLU-conv x3 (1x1, 3x3 strided, 1x1) plus shortcut. x: [B, H, W, cin] -> [B, H/stride, W/stride, cout].

    As timm: the projection shortcut, when present, takes the output of norm1 + ReLU; the
    identity shortcut takes the raw input.
    """

    def __init__(self, cin: int, cout: int, stride: int, project: bool, *, rngs: nnx.Rngs, dtype: Any):
        mid = cout // 4
        self.downsample = Projection(cin, cout, stride, rngs=rngs, dtype=dtype) if project else None
        self.norm1 = _group_norm(cin, rngs=rngs, dtype=dtype)
        self.conv1 = StdConv(cin, mid, 1, rngs=rngs, dtype=dtype)
        self.norm2 = _group_norm(mid, rngs=rngs, dtype=dtype)
        self.conv2 = StdConv(mid, mid, 3, stride, rngs=rngs, dtype=dtype)
        self.norm3 = _group_norm(mid, rngs=rngs, dtype=dtype)
        self.conv3 = StdConv(mid, cout, 1, rngs=rngs, dtype=dtype)

    @remat_block
    def __call__(self, x: jax.Array) -> jax.Array:
        preact = nnx.relu(self.norm1(x))
        shortcut = x if self.downsample is None else self.downsample(preact)
        y = self.conv1(preact)
        y = self.conv2(nnx.relu(self.norm2(y)))
        y = self.conv3(nnx.relu(self.norm3(y)))
        return y + shortcut


class Stage(nnx.Module):
    """`depth` bottlenecks; the first strides and projects. x: [B, H, W, cin] -> [B, H/stride, W/stride, cout]."""

    def __init__(self, cin: int, cout: int, depth: int, stride: int, *, rngs: nnx.Rngs, dtype: Any):
        self.blocks = nnx.List([
            PreActBottleneck(cin if j == 0 else cout, cout, stride if j == 0 else 1, j == 0, rngs=rngs, dtype=dtype)
            for j in range(depth)
        ])

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return x


class Head(nnx.Module):
    """Linear classifier on the average-pooled features, in float32. pooled: [B, C] -> [B, classes]."""

    def __init__(self, features: int, num_classes: int, *, rngs: nnx.Rngs):
        self.fc = nnx.Linear(features, num_classes, kernel_init=_head_init, bias_init=nnx.initializers.zeros,
                             dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, pooled: jax.Array) -> jax.Array:
        return self.fc(pooled)


class ResNetV2(Classifier):
    """BiT ResNetV2. images: float32[B, H, W, 3] -> logits: float32[B, num_classes].

    Stage widths are (256, 512, 1024, 2048) times `width_factor`; the stem has 64 times it.
    There is no BatchNorm, so train and eval modes compute the same function.
    """

    def __init__(
        self,
        *,
        depths: tuple[int, int, int, int],
        width_factor: int,
        num_classes: int,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
    ):
        cin = 64 * width_factor
        self.stem = Stem(cin, rngs=rngs, dtype=dtype)
        stages = []
        for i, (depth, width) in enumerate(zip(depths, (256, 512, 1024, 2048))):
            cout = width * width_factor
            stages.append(Stage(cin, cout, depth, 1 if i == 0 else 2, rngs=rngs, dtype=dtype))
            cin = cout
        self.stages = nnx.List(stages)
        self.norm = _group_norm(cin, rngs=rngs, dtype=dtype)
        self.head = Head(cin, num_classes, rngs=rngs)

    def forward_features(self, images: jax.Array, stages: int = 4) -> jax.Array:
        """The map after the first `stages` stages, [B, h, w, C]; after all four, also the final norm +
        ReLU (timm's split: what the head pools)."""
        x = self.stem(images)
        for stage in self.stages[:stages]:
            x = stage(x)
        return nnx.relu(self.norm(x)) if stages == len(self.stages) else x

    def forward_head(self, features: jax.Array, from_stage: int = 4) -> jax.Array:
        """Logits float32[B, num_classes] from the map after stage `from_stage`: the later stages (and the
        final norm + ReLU), global average pool and classifier."""
        if from_stage < len(self.stages):
            for stage in self.stages[from_stage:]:
                features = stage(features)
            features = nnx.relu(self.norm(features))
        return self.head(self.pooled_features(features))

    def pooled_features(self, features: jax.Array) -> jax.Array:
        """The map after the final norm + ReLU [B, h, w, C] -> its global average float32[B, C]."""
        return jnp.mean(features.astype(jnp.float32), axis=(1, 2))

    def layer_id(self, path: str) -> int:
        parts = path.split("/")
        if parts[0] == "stages":
            return int(parts[1]) + 1
        return 0 if parts[0] == "stem" else len(self.stages) + 1


for _name, _depths, _width in (
    ("resnetv2_50x1_bit", (3, 4, 6, 3), 1),
    ("resnetv2_50x3_bit", (3, 4, 6, 3), 3),
    ("resnetv2_101x1_bit", (3, 4, 23, 3), 1),
    ("resnetv2_101x3_bit", (3, 4, 23, 3), 3),
    ("resnetv2_152x2_bit", (3, 8, 36, 3), 2),
    ("resnetv2_152x4_bit", (3, 8, 36, 3), 4),
):
    register(_name, ResNetV2, depths=_depths, width_factor=_width)
