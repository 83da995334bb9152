"""Geometric ops and decoding against hand-computed results, and the spec parser."""

import dataclasses
import pickle

import grain
import numpy as np
import pytest
from PIL import Image

from jaxclf.data import ops


def _arange_image(h: int, w: int) -> np.ndarray:
    return (np.arange(h * w * 3) % 251).astype(np.uint8).reshape(h, w, 3)


def _rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.Philox(key=seed))


def test_central_crop_is_the_middle_slice():
    image = _arange_image(7, 10)
    out = ops.CentralCrop(4).map({"image": image, "label": 3})
    np.testing.assert_array_equal(out["image"], image[1:5, 3:7])
    assert out["label"] == 3
    with pytest.raises(ValueError, match="resize_small"):
        ops.CentralCrop(8).map({"image": image})


@pytest.mark.parametrize(
    "shape, size, expected", [((10, 25), 4, (4, 10)), ((25, 10), 4, (10, 4)), ((7, 11), 5, (5, 7))]
)
def test_resize_small_keeps_the_aspect_and_truncates_the_long_side(shape, size, expected):
    out = np.asarray(ops.ResizeSmall(size).map({"image": _arange_image(*shape)})["image"])
    assert out.shape == (*expected, 3) and out.dtype == np.uint8


def test_resize_to_a_square_and_to_the_same_size():
    image = _arange_image(6, 9)
    np.testing.assert_array_equal(ops.Resize(5).map({"image": np.full((6, 9, 3), 77, np.uint8)})["image"], 77)
    square = _arange_image(6, 6)
    np.testing.assert_array_equal(ops.Resize(6).map({"image": square})["image"], square)
    expected = np.asarray(Image.fromarray(image).resize((4, 4), Image.BICUBIC))
    np.testing.assert_array_equal(ops.Resize(4, method="bicubic").map({"image": image})["image"], expected)


def test_flip_lr():
    image = _arange_image(3, 5)
    np.testing.assert_array_equal(ops.FlipLr(p=1.0).random_map({"image": image}, _rng(0))["image"], image[:, ::-1])
    np.testing.assert_array_equal(ops.FlipLr(p=0.0).random_map({"image": image}, _rng(0))["image"], image)
    outputs = [ops.FlipLr().random_map({"image": image}, _rng(s))["image"] for s in range(200)]
    flipped = [out[0, 0, 0] != image[0, 0, 0] for out in outputs]
    assert 70 < sum(flipped) < 130


def test_inception_crop_size_and_determinism():
    image = _arange_image(40, 60)
    crop = ops.InceptionCrop(16)
    out = np.asarray(crop.random_map({"image": image}, _rng(3))["image"])
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(crop.random_map({"image": image}, _rng(3))["image"], out)
    assert not np.array_equal(crop.random_map({"image": image}, _rng(4))["image"], out)


def test_inception_crop_boxes_respect_scale_and_ratio():
    crop = ops.InceptionCrop(8, scale=(0.25, 0.5), ratio=(0.5, 2.0))
    for seed in range(100):
        top, left, h, w = crop.crop_box(30, 50, _rng(seed))
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 50
        assert 0.2 * 1500 <= h * w <= 0.55 * 1500  # area after rounding the sides
        assert 0.4 <= w / h <= 2.5


def test_inception_crop_without_resizing_is_a_window_of_the_image():
    image = _arange_image(12, 20)
    # scale and ratio that force an exact 8x8 crop, so the resize is the identity.
    crop = ops.InceptionCrop(8, scale=(64 / 240, 64 / 240), ratio=(1.0, 1.0))
    for seed in range(5):
        out = crop.random_map({"image": image}, _rng(seed))["image"]
        windows = [image[i : i + 8, j : j + 8] for i in range(5) for j in range(13)]
        assert any(np.array_equal(out, w) for w in windows)


def test_inception_crop_falls_back_to_a_central_crop():
    image = _arange_image(16, 16)
    # Aspect 4 at full area never fits a square image: after 10 tries, the 4x16 middle band.
    crop = ops.InceptionCrop(8, scale=(1.0, 1.0), ratio=(4.0, 4.0), exact=True)  # Pillow's resize, as below
    out = crop.random_map({"image": image}, _rng(0))["image"]
    expected = np.asarray(Image.fromarray(np.ascontiguousarray(image[6:10])).resize((8, 8), Image.BILINEAR))
    np.testing.assert_array_equal(out, expected)


def test_random_crop_with_padding_is_a_window_of_the_padded_image():
    image = _arange_image(4, 5)
    padded = np.zeros((8, 9, 3), np.uint8)
    padded[2:6, 2:7] = image  # padding=2 with fill 0, by hand
    windows = {(i, j): padded[i : i + 4, j : j + 4] for i in range(5) for j in range(6)}
    seen = set()
    for seed in range(300):
        out = ops.RandomCrop(4, padding=2).random_map({"image": image}, _rng(seed))["image"]
        assert out.shape == (4, 4, 3) and out.dtype == np.uint8
        offset = next(k for k, w in windows.items() if np.array_equal(out, w))
        seen.add(offset)
    assert len(seen) == len(windows)  # every offset of the padded image occurs
    grey = ops.RandomCrop(8, padding=2, fill=(9, 8, 7)).random_map({"image": image}, _rng(0))["image"]
    np.testing.assert_array_equal(grey[0, 0], [9, 8, 7])  # an 8x8 crop of 8x9 keeps a padded corner row
    with pytest.raises(ValueError, match="random_crop"):
        ops.RandomCrop(10, padding=2).random_map({"image": image}, _rng(0))


def test_rotate_by_90_degrees_is_rot90_and_matches_torchvision():
    import torchvision.transforms.functional as tvf

    image = _arange_image(6, 6)
    out = ops.Rotate((90.0, 90.0), method="nearest").random_map({"image": image}, _rng(0))["image"]
    np.testing.assert_array_equal(out, np.rot90(image))  # counter-clockwise, like torchvision
    rotate = ops.Rotate(30, fill=5)
    angle = _rng(7).uniform(-30, 30)  # the op's one draw
    out = np.asarray(rotate.random_map({"image": _arange_image(9, 12)}, _rng(7))["image"])
    reference = tvf.rotate(Image.fromarray(_arange_image(9, 12)), angle, interpolation=tvf.InterpolationMode.BILINEAR,
                           fill=[5, 5, 5])
    np.testing.assert_array_equal(out, np.asarray(reference))


def test_parse_ops_builds_the_named_ops_in_order():
    parsed = ops.parse_ops(
        "decode(224) | inception_crop(224, scale=(0.08, 1.0))|flip_lr|resize_small(256, method='bicubic')|"
        "random_crop(32, padding=4)|rotate(10)|color_jitter(0.4, 0.4, 0.4, hue=0.1)|randaugment(2, 9)|"
        "trivial_augment|random_erasing(0.25, value=(1, 2, 3))"
    )
    assert parsed == [
        ops.Decode(224),
        ops.InceptionCrop(224, scale=(0.08, 1.0)),
        ops.FlipLr(0.5),
        ops.ResizeSmall(256, method="bicubic"),
        ops.RandomCrop(32, padding=4),
        ops.Rotate(10),
        ops.ColorJitter(0.4, 0.4, 0.4, 0.1),
        ops.RandAugment(2, 9),
        ops.TrivialAugment(),
        ops.RandomErasing(0.25, value=(1, 2, 3)),
    ]
    assert pickle.loads(pickle.dumps(parsed)) == parsed  # grain ships ops to worker processes


@pytest.mark.parametrize(
    "spec, message",
    [
        ("decode|warp(3)", r"unknown op 'warp'.*known ops: central_crop, color_jitter, decode, flip_lr"),
        ("central_crop", "central_crop"),
        ("central_crop(0)", "central_crop"),
        ("central_crop('a')", "central_crop"),
        ("flip_lr(p=2)", "flip_lr"),
        ("inception_crop(8, scale=(1.0, 0.5))", "inception_crop"),
        ("resize(8, method='area')", "resize"),
        ("resize(size=8, colour=1)", "resize"),
        ("resize(__import__('os').getpid())", "resize"),  # arguments are literals, never evaluated code
        ("rotate((5, 1))", "rotate"),
        ("color_jitter(hue=0.7)", "color_jitter"),
        ("randaugment(2, 11)", "randaugment"),
        ("random_erasing(value=300)", "random_erasing"),
        ("random_crop(8, padding=-1)", "random_crop"),
        ("decode(0)", "decode"),
        ("decode||flip_lr", "cannot parse"),
        ("decode.x", "cannot parse"),
    ],
)
def test_parse_ops_errors_name_the_op(spec, message):
    with pytest.raises(ValueError, match=message):
        ops.parse_ops(spec)


def test_register_op_adds_an_op_to_the_parser(monkeypatch):
    monkeypatch.setattr(ops.base, "_OPS", dict(ops.base._OPS))

    @ops.register_op("add")
    @dataclasses.dataclass(frozen=True)
    class Add(grain.transforms.Map):
        value: int

        def map(self, example: dict) -> dict:
            return {**example, "image": example["image"] + self.value}

    (op,) = ops.parse_ops("add(2)")
    np.testing.assert_array_equal(op.map({"image": np.ones((1, 1, 3), np.uint8)})["image"], 3)
    with pytest.raises(ValueError, match="already registered"):
        ops.register_op("add")(ops.Resize)
    with pytest.raises(TypeError, match="Map or RandomMap"):
        ops.register_op("plain")(object)
