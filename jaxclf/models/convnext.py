"""ConvNeXt (convnext_{atto,femto,pico,nano,tiny,small,base,large}) in timm's layout.

Attribute names mirror timm (`stem.0` conv 4x4/4, `stem.1` LayerNorm, `stages.{i}.downsample.{0,1}`
LayerNorm + conv 2x2/2, `stages.{i}.blocks.{j}.{conv_dw, norm, mlp.fc1, mlp.fc2, gamma}`, `head.norm`,
`head.fc`) so converted weights map one-to-one. Blocks: 7x7 depthwise conv, LayerNorm (eps 1e-6, over
channels: NHWC makes timm's LayerNorm2d a plain LayerNorm), MLP with exact GELU, layer scale `gamma`,
stochastic depth. The small sizes use timm's `conv_mlp`: their MLP is two 1x1 convs (`kernel`
[1, 1, in, out], as timm stores them) instead of Linears, the same function.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxclf.models import Classifier, initializers, layers, register, remat_block
from jaxclf.models.drop_path import drop_path

# timm's _init_weights: trunc-normal(0.02) convs and linears, zero biases.
_init = initializers.truncated_normal(0.02)
NUM_STAGES = 4


def _layer_norm(dim: int, *, rngs: nnx.Rngs, dtype: Any) -> nnx.LayerNorm:
    """LayerNorm over channels with timm's eps 1e-6."""
    return nnx.LayerNorm(dim, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def _conv(cin: int, cout: int, kernel: int, stride: int, *, rngs: nnx.Rngs, dtype: Any, groups: int = 1,
          padding: int = 0) -> layers.Conv:
    return layers.Conv(cin, cout, (kernel, kernel), strides=(stride, stride), padding=((padding, padding),) * 2,
                       feature_group_count=groups, kernel_init=_init, bias_init=nnx.initializers.zeros, dtype=dtype,
                       param_dtype=jnp.float32, rngs=rngs)


def _linear(din: int, dout: int, *, rngs: nnx.Rngs, dtype: Any) -> layers.Linear:
    return layers.Linear(din, dout, kernel_init=_init, bias_init=nnx.initializers.zeros, dtype=dtype,
                         param_dtype=jnp.float32, rngs=rngs)


class Mlp(nnx.Module):
    """fc1 -> exact GELU -> fc2 over channels, as Linears or (conv_mlp) 1x1 convs. x: [B, H, W, C] -> same."""

    def __init__(self, dim: int, hidden: int, conv_mlp: bool, *, rngs: nnx.Rngs, dtype: Any):
        if conv_mlp:
            self.fc1 = _conv(dim, hidden, 1, 1, rngs=rngs, dtype=dtype)
            self.fc2 = _conv(hidden, dim, 1, 1, rngs=rngs, dtype=dtype)
        else:
            self.fc1 = _linear(dim, hidden, rngs=rngs, dtype=dtype)
            self.fc2 = _linear(hidden, dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(layers.gelu(self.fc1(x)))


class Block(nnx.Module):
    """x + drop_path(gamma * mlp(norm(conv_dw(x)))). x: [B, H, W, C] -> same."""

    def __init__(self, dim: int, drop_path_rate: float, ls_init_value: float, conv_mlp: bool, *, rngs: nnx.Rngs,
                 dtype: Any):
        self.conv_dw = _conv(dim, dim, 7, 1, groups=dim, padding=3, rngs=rngs, dtype=dtype)
        self.norm = _layer_norm(dim, rngs=rngs, dtype=dtype)
        self.mlp = Mlp(dim, 4 * dim, conv_mlp, rngs=rngs, dtype=dtype)
        self.gamma = nnx.Param(jnp.full((dim,), ls_init_value, jnp.float32))
        self.drop_path = drop_path(drop_path_rate, rngs=rngs)

    @remat_block
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.mlp(self.norm(self.conv_dw(x)))
        return x + self.drop_path(y * self.gamma[...].astype(y.dtype))


class Stage(nnx.Module):
    """[downsample: LayerNorm, conv 2x2/2] then blocks. x: [B, H, W, cin] -> [B, H/stride, W/stride, cout]."""

    def __init__(self, cin: int, cout: int, stride: int, rates: list[float], ls_init_value: float, conv_mlp: bool, *,
                 rngs: nnx.Rngs, dtype: Any):
        self.has_downsample = stride > 1 or cin != cout
        if self.has_downsample:
            self.downsample = nnx.List([_layer_norm(cin, rngs=rngs, dtype=dtype),
                                        _conv(cin, cout, stride, stride, rngs=rngs, dtype=dtype)])
        self.blocks = nnx.List([Block(cout, rate, ls_init_value, conv_mlp, rngs=rngs, dtype=dtype) for rate in rates])

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.has_downsample:
            norm, conv = self.downsample
            x = conv(norm(x))
        for block in self.blocks:
            x = block(x)
        return x


class Head(nnx.Module):
    """timm's NormMlpClassifierHead without hidden layer: global average pool, LayerNorm, dropout, fc.
    Runs in float32: it is cheap and its logits feed the float32 loss."""

    def __init__(self, dim: int, num_classes: int, drop_rate: float, *, rngs: nnx.Rngs):
        self.norm = _layer_norm(dim, rngs=rngs, dtype=jnp.float32)
        self.drop = nnx.Dropout(drop_rate, rngs=rngs if drop_rate > 0 else None)
        self.fc = _linear(dim, num_classes, rngs=rngs, dtype=jnp.float32)

    def __call__(self, features: jax.Array) -> jax.Array:
        return self.fc(self.drop(self.pool(features)))

    def pool(self, features: jax.Array) -> jax.Array:
        """[B, h, w, C] -> the normalised global average float32[B, C] (timm's pre-logits)."""
        return self.norm(jnp.mean(features.astype(jnp.float32), axis=(1, 2)))


class ConvNeXt(Classifier):
    """ConvNeXt. images: float32[B, H, W, 3] (sides multiples of 32) -> logits: float32[B, num_classes].

    `drop_rate` is dropout before the classifier; `drop_path_rate` the stochastic depth of the last block,
    linear from 0 at the first over all blocks (timm's); `ls_init_value` layer scale's initial value;
    `head_init_scale` scales the initial classifier (timm's, for fine-tuning recipes).
    """

    def __init__(
        self,
        *,
        depths: tuple[int, int, int, int],
        dims: tuple[int, int, int, int],
        num_classes: int,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        conv_mlp: bool = False,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        ls_init_value: float = 1e-6,
        head_init_scale: float = 1.0,
    ):
        self.stem = nnx.List([_conv(3, dims[0], 4, 4, rngs=rngs, dtype=dtype),
                              _layer_norm(dims[0], rngs=rngs, dtype=dtype)])
        rates = np.split(np.linspace(0.0, drop_path_rate, sum(depths)), np.cumsum(depths)[:-1])
        cin = dims[0]
        stages = []
        for i, (dim, stage_rates) in enumerate(zip(dims, rates)):
            stages.append(Stage(cin, dim, 1 if i == 0 else 2, [float(r) for r in stage_rates], ls_init_value,
                                conv_mlp, rngs=rngs, dtype=dtype))
            cin = dim
        self.stages = nnx.List(stages)
        self.head = Head(cin, num_classes, drop_rate, rngs=rngs)
        if head_init_scale != 1.0:
            self.head.fc.kernel[...] *= head_init_scale
            self.head.fc.bias[...] *= head_init_scale

    def forward_features(self, images: jax.Array, stages: int = NUM_STAGES) -> jax.Array:
        """The feature map after the first `stages` stages, [B, h, w, C]."""
        conv, norm = self.stem
        x = norm(conv(images))
        for stage in self.stages[:stages]:
            x = stage(x)
        return x

    def forward_head(self, features: jax.Array, from_stage: int = NUM_STAGES) -> jax.Array:
        """Logits float32[B, num_classes] from the map after stage `from_stage`."""
        for stage in self.stages[from_stage:]:
            features = stage(features)
        return self.head(features)

    def pooled_features(self, features: jax.Array) -> jax.Array:
        """The map after the last stage -> the head's normalised average float32[B, C]."""
        return self.head.pool(features)

    def head_paths(self) -> tuple[str, ...]:
        return ("head/fc",)

    def layer_id(self, path: str) -> int:
        """timm's fine-grained groups: 0 the stem, one per block in order (a stage's downsample with its
        first block), then the head."""
        parts = path.split("/")
        if parts[0] == "stem":
            return 0
        if parts[0] != "stages":
            return sum(len(stage.blocks) for stage in self.stages) + 1
        stage = int(parts[1])
        block = int(parts[3]) if parts[2] == "blocks" else 0
        return 1 + sum(len(s.blocks) for s in self.stages[:stage]) + block


for _size, (_depths, _dims, _conv_mlp) in {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320), True),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384), True),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512), True),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640), True),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768), False),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768), False),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024), False),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536), False),
}.items():
    register(f"convnext_{_size}", ConvNeXt, depths=_depths, dims=_dims, conv_mlp=_conv_mlp)
