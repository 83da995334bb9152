"""ResNet v1.5 (resnet18/34/50/101/152) in the torchvision/timm layout.

Attribute names mirror torchvision (`conv1`, `bn1`, `layer1`..`layer4`, `fc`; blocks `conv1`,
`bn1`, ..., `downsample.0` conv and `downsample.1` BN) so converted weights map one-to-one.
Padding is explicit and symmetric like PyTorch's, not XLA 'SAME': on even inputs 'SAME' pads
stride-2 layers only at the bottom/right, which shifts every feature map of converted weights.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxclf.kernels import xla_cpu
from jaxclf.models import channels, initializers, layers
from jaxclf.models.base import Classifier, register, remat_block

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"), an untruncated normal.
_conv_init = initializers.variance_scaling(2.0, "fan_out", "normal")
# torch nn.Linear's default weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_fc_init = initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
STAGES = ("layer1", "layer2", "layer3", "layer4")


def _conv(cin: int, cout: int, kernel: int, stride: int, *, rngs: nnx.Rngs, dtype: Any) -> layers.Conv:
    """Bias-free `kernel`x`kernel` conv padded by (kernel-1)//2 on every side, like torchvision."""
    pad = (kernel - 1) // 2
    return layers.Conv(
        cin, cout, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)), use_bias=False,
        kernel_init=_conv_init, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
    )


def _bn(features: int, *, rngs: nnx.Rngs, dtype: Any, zero_scale: bool = False) -> nnx.BatchNorm:
    """BatchNorm with torch's eps; flax momentum 0.9 is torch's momentum=0.1."""
    return nnx.BatchNorm(
        features, momentum=0.9, epsilon=1e-5,
        scale_init=nnx.initializers.zeros if zero_scale else nnx.initializers.ones,
        dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
    )


def _downsample(cin: int, cout: int, stride: int, *, rngs: nnx.Rngs, dtype: Any) -> nnx.List | None:
    """Shortcut projection [1x1/stride conv, BN] (torch `downsample.0/.1`), None for identity."""
    if stride == 1 and cin == cout:
        return None
    conv = _conv(cin, cout, 1, stride, rngs=rngs, dtype=dtype)
    return nnx.List([conv, _bn(cout, rngs=rngs, dtype=dtype)])


def _shortcut(downsample: nnx.List | None, x: jax.Array) -> jax.Array:
    """Applies the block's shortcut: identity or conv + BN."""
    if downsample is None:
        return x
    conv, bn = downsample
    return bn(conv(x))


class BasicBlock(nnx.Module):
    """Two 3x3 convs plus shortcut (resnet18/34). x: [B, H, W, cin] -> [B, H/stride, W/stride, planes];
    `width` channels between the convs (planes unless structured pruning narrowed it)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, *, zero_init_last_bn: bool, rngs: nnx.Rngs, dtype: Any,
                 width: int | None = None):
        width = width or planes
        self.conv1 = _conv(cin, width, 3, stride, rngs=rngs, dtype=dtype)
        self.bn1 = _bn(width, rngs=rngs, dtype=dtype)
        self.conv2 = _conv(width, planes, 3, 1, rngs=rngs, dtype=dtype)
        self.bn2 = _bn(planes, rngs=rngs, dtype=dtype, zero_scale=zero_init_last_bn)
        self.downsample = _downsample(cin, planes, stride, rngs=rngs, dtype=dtype)

    @remat_block
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return nnx.relu(y + _shortcut(self.downsample, x))

    @staticmethod
    def channel_groups(prefix: str, block: int) -> list[channels.ChannelGroup]:
        """conv1's outputs, read by conv2."""
        return [channels.ChannelGroup(block, f"{prefix}/conv1/kernel",
                                      (f"{prefix}/conv1/kernel", *channels.batch_norm(f"{prefix}/bn1")),
                                      (f"{prefix}/conv2/kernel",))]


class Bottleneck(nnx.Module):
    """1x1 -> 3x3 (strided, v1.5) -> 1x1 convs plus shortcut (resnet50+).

    x: [B, H, W, cin] -> [B, H/stride, W/stride, 4 * planes]; `width` channels inside (planes unless pruned).
    """

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, *, zero_init_last_bn: bool, rngs: nnx.Rngs, dtype: Any,
                 width: int | None = None):
        cout, width = planes * self.expansion, width or planes
        self.conv1 = _conv(cin, width, 1, 1, rngs=rngs, dtype=dtype)
        self.bn1 = _bn(width, rngs=rngs, dtype=dtype)
        self.conv2 = _conv(width, width, 3, stride, rngs=rngs, dtype=dtype)
        self.bn2 = _bn(width, rngs=rngs, dtype=dtype)
        self.conv3 = _conv(width, cout, 1, 1, rngs=rngs, dtype=dtype)
        self.bn3 = _bn(cout, rngs=rngs, dtype=dtype, zero_scale=zero_init_last_bn)
        self.downsample = _downsample(cin, cout, stride, rngs=rngs, dtype=dtype)

    @remat_block
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = nnx.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return nnx.relu(y + _shortcut(self.downsample, x))

    @staticmethod
    def channel_groups(prefix: str, block: int) -> list[channels.ChannelGroup]:
        """conv1's outputs (read by conv2) and conv2's (read by conv3), pruned to the same count."""
        return [channels.ChannelGroup(block, f"{prefix}/{conv}/kernel",
                                      (f"{prefix}/{conv}/kernel", *channels.batch_norm(f"{prefix}/{bn}")),
                                      (f"{prefix}/{reader}/kernel",))
                for conv, bn, reader in (("conv1", "bn1", "conv2"), ("conv2", "bn2", "conv3"))]


class ResNet(Classifier):
    """ResNet v1.5. images: float32[B, H, W, 3] -> logits: float32[B, num_classes].

    `zero_init_last_bn` zero-inits each block's last BN scale so blocks start as identities. `block_widths`
    (one per block, layer1 first; () for the architecture's) narrows each block's inner convs: structured
    pruning's smaller model (jaxclf/models/channels.py), the residual width unchanged.
    """

    def __init__(
        self,
        *,
        block: type[BasicBlock] | type[Bottleneck],
        depths: tuple[int, int, int, int],
        num_classes: int,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        zero_init_last_bn: bool = False,
        block_widths: tuple[int, ...] = (),
    ):
        self.bottleneck = block is Bottleneck
        planes_of_blocks = [planes for planes, depth in zip((64, 128, 256, 512), depths) for _ in range(depth)]
        if block_widths and len(block_widths) != len(planes_of_blocks):
            raise ValueError(f"block_widths has {len(block_widths)} entries; this ResNet has {len(planes_of_blocks)} "
                             "blocks (one inner width each, layer1 first)")
        self.block_widths = tuple(block_widths) or tuple(planes_of_blocks)
        widths = iter(self.block_widths)
        self.conv1 = _conv(3, 64, 7, 2, rngs=rngs, dtype=dtype)
        self.bn1 = _bn(64, rngs=rngs, dtype=dtype)
        cin = 64

        def make_layer(planes: int, depth: int, stride: int) -> nnx.List:
            nonlocal cin
            blocks = []
            for i in range(depth):
                blocks.append(block(cin, planes, stride if i == 0 else 1, width=next(widths),
                                    zero_init_last_bn=zero_init_last_bn, rngs=rngs, dtype=dtype))
                cin = planes * block.expansion
            return nnx.List(blocks)

        self.layer1 = make_layer(64, depths[0], 1)
        self.layer2 = make_layer(128, depths[1], 2)
        self.layer3 = make_layer(256, depths[2], 2)
        self.layer4 = make_layer(512, depths[3], 2)
        # The head runs in float32: it is cheap and its logits feed the float32 loss.
        self.fc = nnx.Linear(cin, num_classes, kernel_init=_fc_init, bias_init=nnx.initializers.zeros,
                             dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)

    def forward_features(self, images: jax.Array, stages: int = 4) -> jax.Array:
        """The feature map after the first `stages` stages, [B, h, w, C] (all four: what the head pools)."""
        x = nnx.relu(self.bn1(self.conv1(images)))
        x = layers.max_pool_3x3_s2(x)
        for name in STAGES[:stages]:
            for blk in getattr(self, name):
                x = blk(x)
        return x

    def forward_head(self, features: jax.Array, from_stage: int = 4) -> jax.Array:
        """Logits float32[B, num_classes] from the map after stage `from_stage`: the later stages,
        global average pool and classifier."""
        for name in STAGES[from_stage:]:
            for blk in getattr(self, name):
                features = blk(features)
        return self.fc(self.pooled_features(features))

    def pooled_features(self, features: jax.Array) -> jax.Array:
        """The map after the last stage [B, h, w, C] -> its global average float32[B, C]."""
        return jnp.mean(features.astype(jnp.float32), axis=(1, 2))

    def head_paths(self) -> tuple[str, ...]:
        return ("fc",)

    def layer_id(self, path: str) -> int:
        top = path.split("/")[0]
        return STAGES.index(top) + 1 if top in STAGES else (len(STAGES) + 1 if top == "fc" else 0)

    def channel_groups(self) -> list[channels.ChannelGroup]:
        blocks = [(f"{name}/{i}", blk) for name in STAGES for i, blk in enumerate(getattr(self, name))]
        return [group for index, (prefix, blk) in enumerate(blocks) for group in blk.channel_groups(prefix, index)]

    def xla_cpu_train_options(self) -> dict[str, Any]:
        return xla_cpu.BOTTLENECK_TRAIN_OPTIONS if self.bottleneck else {}


for _name, _block, _depths in (
    ("resnet18", BasicBlock, (2, 2, 2, 2)),
    ("resnet34", BasicBlock, (3, 4, 6, 3)),
    ("resnet50", Bottleneck, (3, 4, 6, 3)),
    ("resnet101", Bottleneck, (3, 4, 23, 3)),
    ("resnet152", Bottleneck, (3, 8, 36, 3)),
):
    register(_name, ResNet, block=_block, depths=_depths)
