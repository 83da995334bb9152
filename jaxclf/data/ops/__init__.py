"""Preprocessing ops, named in order by a config string: `"decode|inception_crop(224)|flip_lr"`.

Each op is a grain transform mapping an example dict to an example dict; images stay 8-bit
(PIL images or `uint8[H, W, 3]` arrays, see base.py): normalisation to float happens on the
device, in the jitted step, so the workers do no float work and ship 4x fewer bytes. Random ops
are `grain.transforms.RandomMap` and draw only from the per-record `np.random.Generator` grain
passes in, so a seed fixes every crop.

Adding an op: subclass `grain.transforms.Map` (or `RandomMap`) as a dataclass whose fields are the
op's arguments, and register it under the name configs use; import its module before parsing:

    @register_op("grayscale")
    @dataclasses.dataclass(frozen=True)
    class Grayscale(grain.transforms.Map):
        def map(self, example: dict) -> dict:
            return {**example, "image": as_pil(example["image"]).convert("L").convert("RGB")}

The class must live at module level of an importable module: grain pickles ops into its worker
processes. Arguments in a spec are Python literals (`ast.literal_eval`: numbers, strings, tuples).
"""

from jaxclf.data.ops.autoaugment import RandAugment, TrivialAugment
from jaxclf.data.ops.base import Op, as_array, as_pil, parse_ops, register_op
from jaxclf.data.ops.color import ColorJitter, RandomErasing
from jaxclf.data.ops.decode import DEFAULT_MAX_IMAGE_PIXELS, BadImage, Decode, TooManyPixels
from jaxclf.data.ops.geometry import (
    CentralCrop,
    FlipLr,
    InceptionCrop,
    RandomCrop,
    Resize,
    ResizeSmall,
    Rotate,
)

__all__ = [
    "BadImage",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "CentralCrop",
    "ColorJitter",
    "Decode",
    "TooManyPixels",
    "FlipLr",
    "InceptionCrop",
    "Op",
    "RandAugment",
    "RandomCrop",
    "RandomErasing",
    "Resize",
    "ResizeSmall",
    "Rotate",
    "TrivialAugment",
    "as_array",
    "as_pil",
    "parse_ops",
    "register_op",
]
