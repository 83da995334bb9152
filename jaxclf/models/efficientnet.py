"""EfficientNet (efficientnet_b0..b7, tf_efficientnet_b0..b7) and MobileNetV3 (mobilenetv3_{large,small}_100)
in timm's layout.

Both are stacks of timm's `_efficientnet_blocks`: a stem conv, groups of blocks (`blocks.{group}.{i}`:
DepthwiseSeparable, InvertedResidual with optional squeeze-excitation, ConvBnAct), then a head.
Attribute names mirror timm (`conv_stem`, `bn1`, `conv_dw`, `conv_pw`, `conv_pwl`, `se.conv_reduce`,
`conv_head`, `bn2`, `classifier`) so converted weights map one-to-one. The architectures are written in
timm's block-string notation (`ir_r2_k3_s2_e6_c24_se0.25`: inverted residual, 2 repeats, 3x3 depthwise,
stride 2, expansion 6, 24 channels, SE ratio 0.25; `nre`: ReLU) and scaled by timm's rules (channels
rounded to multiples of 8, repeats by ceil). Padding is torch's symmetric (k-1)//2, or TF "SAME" for
the `tf_` variants whose weights came from the paper's TensorFlow code (with BatchNorm eps 1e-3).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxclf.models import Classifier, channels, initializers, layers, register, remat_block
from jaxclf.models.drop_path import drop_path

# timm's _init_weight_goog: convs N(0, 2/fan_out) with fan_out counted per group (for a depthwise
# kernel [k, k, 1, C] that is k*k, flax's fan_in); the classifier U(+-1/sqrt(num_classes)).
_conv_init = initializers.variance_scaling(2.0, "fan_out", "normal")
_depthwise_init = initializers.variance_scaling(2.0, "fan_in", "normal")
_classifier_init = initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")

ACTIVATIONS = {"relu": jax.nn.relu, "silu": jax.nn.silu, "hard_swish": jax.nn.hard_swish}
GATES = {"sigmoid": jax.nn.sigmoid, "hard_sigmoid": jax.nn.hard_sigmoid}
NUM_STAGES = 4  # Grad-CAM stages: the maps at strides 4, 8, 16 and 32


@dataclasses.dataclass(frozen=True)
class BlockArgs:
    """One entry of timm's block-string notation (`ir_r2_k3_s2_e6_c24_se0.25_nre`)."""

    kind: str  # "ds" depthwise-separable, "ir" inverted residual, "cn" conv-bn-act
    repeats: int
    kernel: int
    stride: int
    expansion: float
    channels: int
    se_ratio: float
    relu: bool  # "nre": ReLU instead of the model's activation


def decode_block(text: str) -> BlockArgs:
    """`BlockArgs` from timm's block string; ValueError naming the string when it is not one."""
    kind, *options = text.split("_")
    values = {"r": 1, "k": 3, "s": 1, "e": 1.0, "c": None, "se": 0.0}
    relu = False
    for option in options:
        match = re.fullmatch(r"(se|[rksec])([\d.]+)", option)
        if option == "nre":
            relu = True
        elif match:
            values[match[1]] = float(match[2])
        else:
            raise ValueError(f"block string {text!r}: unknown option {option!r}")
    if kind not in ("ds", "ir", "cn") or values["c"] is None:
        raise ValueError(f"block string {text!r}: expected ds/ir/cn with a channel count c<N>")
    return BlockArgs(kind, int(values["r"]), int(values["k"]), int(values["s"]), values["e"], int(values["c"]),
                     values["se"], relu)


def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """timm's `make_divisible`: `value` rounded to a multiple of `divisor`, never below `round_limit` of it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < round_limit * value else rounded


def scale_stage_depth(stage: list[BlockArgs], depth_multiplier: float) -> list[BlockArgs]:
    """timm's `_scale_stage_depth` ('ceil'): the stage's total repeats scaled up, spread over its entries from
    the last; returns one `BlockArgs` per block."""
    total = sum(b.repeats for b in stage)
    scaled_total = int(math.ceil(total * depth_multiplier))
    repeats = []
    for block in reversed(stage):
        scaled = max(1, round(block.repeats / total * scaled_total))
        repeats.append(scaled)
        total -= block.repeats
        scaled_total -= scaled
    return [block for block, r in zip(stage, reversed(repeats)) for _ in range(r)]


@dataclasses.dataclass(frozen=True)
class Variant:
    """What differs between the ports and families: BatchNorm eps, padding ("torch" symmetric or TF "same"),
    and the squeeze-excitation's width (from the block input, EfficientNet, or the expanded width rounded to
    8, MobileNetV3), activation (None: the block's) and gate."""

    bn_eps: float = 1e-5
    padding: str = "torch"
    se_from_expanded: bool = False
    se_act: str | None = None
    se_gate: str = "sigmoid"

    def se_channels(self, expanded: int, se_ratio: float, expansion: float) -> int:
        """The SE bottleneck width, as timm's builder computes it."""
        if self.se_from_expanded:
            return make_divisible(expanded * se_ratio)
        return round(expanded * (se_ratio / expansion))


def _conv(cin: int, cout: int, kernel: int, stride: int, variant: Variant, *, rngs: nnx.Rngs, dtype: Any,
          groups: int = 1, bias: bool = False) -> layers.Conv:
    """timm's `create_conv2d`: torch's symmetric padding (kernel-1)//2, or TF "SAME" (more at the bottom/right)."""
    pad = (kernel - 1) // 2
    padding = "SAME" if variant.padding == "same" else ((pad, pad), (pad, pad))
    return layers.Conv(cin, cout, (kernel, kernel), strides=(stride, stride), padding=padding,
                       feature_group_count=groups, use_bias=bias,
                       kernel_init=_depthwise_init if groups > 1 else _conv_init, bias_init=nnx.initializers.zeros,
                       dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def _bn(features: int, variant: Variant, *, rngs: nnx.Rngs, dtype: Any) -> nnx.BatchNorm:
    """BatchNorm with timm's momentum 0.1 (flax's 0.9) and the port's eps."""
    return nnx.BatchNorm(features, momentum=0.9, epsilon=variant.bn_eps, dtype=dtype, param_dtype=jnp.float32,
                         rngs=rngs)


class SqueezeExcite(nnx.Module):
    """x * gate(conv_expand(act(conv_reduce(mean over H, W)))). x: [B, H, W, C] -> same."""

    def __init__(self, channels: int, reduced: int, act: str, gate: str, *, rngs: nnx.Rngs, dtype: Any):
        self.act, self.gate = act, gate
        self.conv_reduce = _conv(channels, reduced, 1, 1, Variant(), rngs=rngs, dtype=dtype, bias=True)
        self.conv_expand = _conv(reduced, channels, 1, 1, Variant(), rngs=rngs, dtype=dtype, bias=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        squeezed = jnp.mean(x, axis=(1, 2), keepdims=True)
        return x * GATES[self.gate](self.conv_expand(ACTIVATIONS[self.act](self.conv_reduce(squeezed))))


class Block(nnx.Module):
    """One of timm's blocks, by `args.kind`. x: [B, H, W, cin] -> [B, H/stride, W/stride, cout].

    - "ds" DepthwiseSeparableConv: conv_dw, bn1 + act, [se], conv_pw, bn2;
    - "ir" InvertedResidual: conv_pw, bn1 + act, conv_dw, bn2 + act, [se], conv_pwl, bn3;
    - "cn" ConvBnAct: conv, bn1 + act.
    ds/ir add the input (through stochastic depth) where the shape is kept. `width` narrows an "ir" block's
    expanded channels (structured pruning; the SE keeps the width the design gives it).
    """

    def __init__(self, args: BlockArgs, cin: int, cout: int, act: str, variant: Variant, drop_path_rate: float, *,
                 rngs: nnx.Rngs, dtype: Any, width: int = 0):
        if width and args.kind != "ir":
            raise ValueError(f"block_widths: a {args.kind!r} block has no inner width to narrow; give 0 for it")
        self.kind = args.kind
        self.act = "relu" if args.relu else act
        self.has_skip = args.kind != "cn" and args.stride == 1 and cin == cout
        self.has_se = args.se_ratio > 0
        conv = dict(rngs=rngs, dtype=dtype)
        if args.kind == "cn":
            self.conv = _conv(cin, cout, args.kernel, args.stride, variant, **conv)
            self.bn1 = _bn(cout, variant, **conv)
            return
        designed = cin if args.kind == "ds" else make_divisible(cin * args.expansion)
        mid = width or designed
        bns = iter(("bn1", "bn2", "bn3"))
        if args.kind == "ir":
            self.conv_pw = _conv(cin, mid, 1, 1, variant, **conv)
            setattr(self, next(bns), _bn(mid, variant, **conv))
        self.conv_dw = _conv(mid, mid, args.kernel, args.stride, variant, groups=mid, **conv)
        setattr(self, next(bns), _bn(mid, variant, **conv))
        if self.has_se:
            reduced = variant.se_channels(designed, args.se_ratio, args.expansion)
            self.se = SqueezeExcite(mid, reduced, variant.se_act or self.act, variant.se_gate, **conv)
        # timm names the projection conv_pw in a ds block, conv_pwl in an ir block.
        setattr(self, "conv_pw" if args.kind == "ds" else "conv_pwl", _conv(mid, cout, 1, 1, variant, **conv))
        setattr(self, next(bns), _bn(cout, variant, **conv))
        self.drop_path = drop_path(drop_path_rate if self.has_skip else 0.0, rngs=rngs)

    @remat_block
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.act]
        if self.kind == "cn":
            return act(self.bn1(self.conv(x)))
        y = x
        if self.kind == "ir":
            y = act(self.bn1(self.conv_pw(y)))
            y = act(self.bn2(self.conv_dw(y)))
        else:
            y = act(self.bn1(self.conv_dw(y)))
        if self.has_se:
            y = self.se(y)
        y = self.bn3(self.conv_pwl(y)) if self.kind == "ir" else self.bn2(self.conv_pw(y))
        return x + self.drop_path(y) if self.has_skip else y

    def channel_groups(self, prefix: str, block: int) -> list[channels.ChannelGroup]:
        """An "ir" block's expanded channels: made by conv_pw, bn1, conv_dw, bn2 (and SE's expand), read by
        conv_pwl (and SE's reduce); none for ds/cn blocks, whose inner width is their input or output."""
        if self.kind != "ir":
            return []
        se = (f"{prefix}/se/conv_expand/kernel", f"{prefix}/se/conv_expand/bias") if self.has_se else ()
        outputs = (f"{prefix}/conv_pw/kernel", *channels.batch_norm(f"{prefix}/bn1"), f"{prefix}/conv_dw/kernel",
                   *channels.batch_norm(f"{prefix}/bn2"), *se)
        inputs = ((f"{prefix}/se/conv_reduce/kernel",) if self.has_se else ()) + (f"{prefix}/conv_pwl/kernel",)
        return [channels.ChannelGroup(block, f"{prefix}/conv_pw/kernel", outputs, inputs)]


def _classifier(features: int, num_classes: int, *, rngs: nnx.Rngs) -> nnx.Linear:
    """The classifier, in float32: it is cheap and its logits feed the float32 loss."""
    return nnx.Linear(features, num_classes, kernel_init=_classifier_init, bias_init=nnx.initializers.zeros,
                      dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)


class EfficientNet(Classifier):
    """EfficientNet. images: float32[B, H, W, 3] (any size) -> logits: float32[B, num_classes].

    `arch` is a list of stages of timm block strings, scaled by `channel_multiplier` (channels, rounded to
    8) and `depth_multiplier` (repeats); `act` the activation; `drop_rate` dropout before the classifier;
    `drop_path_rate` the stochastic depth of the last block, linear from 0 at the first (timm's rule);
    `bn_eps` and `padding` ("torch" or TF "same") select the port. `block_widths` (one per block, in order;
    0 or () for the design's) narrows inverted residuals' expanded channels: structured pruning's smaller model.
    """

    variant = Variant()  # the family's squeeze-excitation; bn_eps and padding come from the options

    def __init__(
        self,
        *,
        arch: tuple[tuple[str, ...], ...],
        num_classes: int,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        channel_multiplier: float = 1.0,
        depth_multiplier: float = 1.0,
        stem_size: int = 32,
        num_features: int = 1280,
        act: str = "silu",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        bn_eps: float = 1e-5,
        padding: str = "torch",
        block_widths: tuple[int, ...] = (),
    ):
        if padding not in ("torch", "same"):
            raise ValueError(f"padding={padding!r}: use 'torch' (symmetric, timm) or 'same' (TensorFlow's)")
        if act not in ACTIVATIONS:
            raise ValueError(f"act={act!r}: use one of {', '.join(ACTIVATIONS)}")
        variant = dataclasses.replace(self.variant, bn_eps=bn_eps, padding=padding)
        conv = dict(rngs=rngs, dtype=dtype)
        self.act, self.bn_eps, self.padding = act, bn_eps, padding

        def round_channels(channels: int) -> int:
            return make_divisible(channels * channel_multiplier)

        stem = round_channels(stem_size)
        self.conv_stem = _conv(3, stem, 3, 2, variant, **conv)
        self.bn1 = _bn(stem, variant, **conv)
        stages = [scale_stage_depth([decode_block(text) for text in stage], depth_multiplier) for stage in arch]
        total = sum(len(stage) for stage in stages)
        if block_widths and len(block_widths) != total:
            raise ValueError(f"block_widths has {len(block_widths)} entries; this model has {total} blocks "
                             "(one inner width each, 0 for the design's)")
        self.block_widths = tuple(block_widths) or (0,) * total
        cin, index, reduction, stage_ends = stem, 0, 2, []
        groups = []
        for stage in stages:
            blocks = []
            for i, args in enumerate(stage):
                cout = round_channels(args.channels)
                stride = args.stride if i == 0 else 1
                blocks.append(Block(dataclasses.replace(args, stride=stride), cin, cout, act, variant,
                                    drop_path_rate * index / total, width=self.block_widths[index], **conv))
                cin, index = cout, index + 1
            reduction *= stage[0].stride
            groups.append(nnx.List(blocks))
            stage_ends.append(reduction)
        self.blocks = nnx.List(groups)
        # Stage s (1..4) of Grad-CAM ends with the last block group at stride 2**(s + 1).
        self.stage_groups = tuple(sum(r <= 2 ** (s + 1) for r in stage_ends) for s in range(1, NUM_STAGES + 1))
        self.num_blocks = total
        self._build_head(cin, num_features, num_classes, round_channels, variant, **conv)
        self.head_drop = nnx.Dropout(drop_rate, rngs=rngs if drop_rate > 0 else None)

    def _build_head(self, cin: int, num_features: int, num_classes: int, round_channels, variant: Variant, *,
                    rngs: nnx.Rngs, dtype: Any) -> None:
        """conv_head (1x1) and bn2 + act before pooling, then the classifier (timm's EfficientNet head)."""
        features = round_channels(num_features)
        self.conv_head = _conv(cin, features, 1, 1, variant, rngs=rngs, dtype=dtype)
        self.bn2 = _bn(features, variant, rngs=rngs, dtype=dtype)
        self.classifier = _classifier(features, num_classes, rngs=rngs)

    def forward_features(self, images: jax.Array, stages: int = NUM_STAGES) -> jax.Array:
        """The feature map after the first `stages` stages, [B, h, w, C]; with all of them, what timm's
        forward_features returns (for EfficientNet after conv_head/bn2)."""
        x = ACTIVATIONS[self.act](self.bn1(self.conv_stem(images)))
        for group in self.blocks[: self.stage_groups[stages - 1]]:
            for block in group:
                x = block(x)
        return self._pre_pool(x) if stages == NUM_STAGES else x

    def forward_head(self, features: jax.Array, from_stage: int = NUM_STAGES) -> jax.Array:
        """Logits float32[B, num_classes] from the map after stage `from_stage`."""
        if from_stage < NUM_STAGES:
            for group in self.blocks[self.stage_groups[from_stage - 1]:]:
                for block in group:
                    features = block(features)
            features = self._pre_pool(features)
        return self.classifier(self.head_drop(self.pooled_features(features)))

    def pooled_features(self, features: jax.Array) -> jax.Array:
        """The map after all stages -> what the classifier reads, float32[B, D]: its global average
        (MobileNetV3: then its conv_head and activation)."""
        return self._after_pool(jnp.mean(features.astype(jnp.float32), axis=(1, 2)))

    def _pre_pool(self, x: jax.Array) -> jax.Array:
        return ACTIVATIONS[self.act](self.bn2(self.conv_head(x)))

    def _after_pool(self, pooled: jax.Array) -> jax.Array:
        return pooled

    def head_paths(self) -> tuple[str, ...]:
        return ("classifier",)

    def channel_groups(self) -> list[channels.ChannelGroup]:
        blocks = [(f"blocks/{g}/{i}", block) for g, group in enumerate(self.blocks) for i, block in enumerate(group)]
        return [group for index, (prefix, block) in enumerate(blocks) for group in block.channel_groups(prefix, index)]

    def layer_id(self, path: str) -> int:
        """timm's fine-grained groups: 0 the stem, one per block in order, then the head."""
        parts = path.split("/")
        if parts[0] == "blocks":
            group, block = int(parts[1]), int(parts[2])
            return 1 + sum(len(g) for g in self.blocks[:group]) + block
        return 0 if parts[0] in ("conv_stem", "bn1") else self.num_blocks + 1


class MobileNetV3(EfficientNet):
    """MobileNetV3: EfficientNet's builder with hard-swish, SE gated by hard-sigmoid on the expanded width
    (ReLU inside), an unscaled 16-channel stem and timm's "efficient head": global pool, then conv_head
    (1x1, with bias, no BN) + act, then the classifier."""

    variant = Variant(se_from_expanded=True, se_act="relu", se_gate="hard_sigmoid")

    def __init__(self, *, arch: tuple[tuple[str, ...], ...], num_classes: int, rngs: nnx.Rngs,
                 dtype: Any = jnp.float32, num_features: int = 1280, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, bn_eps: float = 1e-5, block_widths: tuple[int, ...] = ()):
        super().__init__(arch=arch, num_classes=num_classes, rngs=rngs, dtype=dtype, stem_size=16,
                         num_features=num_features, act="hard_swish", drop_rate=drop_rate,
                         drop_path_rate=drop_path_rate, bn_eps=bn_eps, block_widths=block_widths)

    def _build_head(self, cin: int, num_features: int, num_classes: int, round_channels, variant: Variant, *,
                    rngs: nnx.Rngs, dtype: Any) -> None:
        self.conv_head = _conv(cin, num_features, 1, 1, variant, rngs=rngs, dtype=dtype, bias=True)
        self.classifier = _classifier(num_features, num_classes, rngs=rngs)

    def _pre_pool(self, x: jax.Array) -> jax.Array:
        return x

    def _after_pool(self, pooled: jax.Array) -> jax.Array:
        return ACTIVATIONS[self.act](self.conv_head(pooled[:, None, None, :]))[:, 0, 0].astype(jnp.float32)

    def layer_id(self, path: str) -> int:
        return self.num_blocks + 1 if path.split("/")[0] == "conv_head" else super().layer_id(path)


EFFICIENTNET_ARCH = (
    ("ds_r1_k3_s1_e1_c16_se0.25",),
    ("ir_r2_k3_s2_e6_c24_se0.25",),
    ("ir_r2_k5_s2_e6_c40_se0.25",),
    ("ir_r3_k3_s2_e6_c80_se0.25",),
    ("ir_r3_k5_s1_e6_c112_se0.25",),
    ("ir_r4_k5_s2_e6_c192_se0.25",),
    ("ir_r1_k3_s1_e6_c320_se0.25",),
)
MOBILENETV3_LARGE_ARCH = (
    ("ds_r1_k3_s1_e1_c16_nre",),
    ("ir_r1_k3_s2_e4_c24_nre", "ir_r1_k3_s1_e3_c24_nre"),
    ("ir_r3_k5_s2_e3_c40_se0.25_nre",),
    ("ir_r1_k3_s2_e6_c80", "ir_r1_k3_s1_e2.5_c80", "ir_r2_k3_s1_e2.3_c80"),
    ("ir_r2_k3_s1_e6_c112_se0.25",),
    ("ir_r3_k5_s2_e6_c160_se0.25",),
    ("cn_r1_k1_s1_c960",),
)
MOBILENETV3_SMALL_ARCH = (
    ("ds_r1_k3_s2_e1_c16_se0.25_nre",),
    ("ir_r1_k3_s2_e4.5_c24_nre", "ir_r1_k3_s1_e3.67_c24_nre"),
    ("ir_r1_k5_s2_e4_c40_se0.25", "ir_r2_k5_s1_e6_c40_se0.25"),
    ("ir_r2_k5_s1_e3_c48_se0.25",),
    ("ir_r3_k5_s2_e6_c96_se0.25",),
    ("cn_r1_k1_s1_c576",),
)
# timm's (channel_multiplier, depth_multiplier) per size; resolution and dropout are a config's choice.
EFFICIENTNET_SCALES = {
    "b0": (1.0, 1.0), "b1": (1.0, 1.1), "b2": (1.1, 1.2), "b3": (1.2, 1.4),
    "b4": (1.4, 1.8), "b5": (1.6, 2.2), "b6": (1.8, 2.6), "b7": (2.0, 3.1),
}
# The resolution each size was trained at (timm's pretrained input size), by model name.
INPUT_SIZES = {f"{prefix}efficientnet_{size}": side for prefix in ("", "tf_") for size, side in
               {"b0": 224, "b1": 240, "b2": 260, "b3": 300, "b4": 380, "b5": 456, "b6": 528, "b7": 600}.items()}

for _size, (_width, _depth) in EFFICIENTNET_SCALES.items():
    register(f"efficientnet_{_size}", EfficientNet, arch=EFFICIENTNET_ARCH, channel_multiplier=_width,
             depth_multiplier=_depth)
    register(f"tf_efficientnet_{_size}", EfficientNet, arch=EFFICIENTNET_ARCH, channel_multiplier=_width,
             depth_multiplier=_depth, bn_eps=1e-3, padding="same")
register("mobilenetv3_large_100", MobileNetV3, arch=MOBILENETV3_LARGE_ARCH, num_features=1280)
register("mobilenetv3_small_100", MobileNetV3, arch=MOBILENETV3_SMALL_ARCH, num_features=1024)
