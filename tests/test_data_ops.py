"""Preprocessing ops against hand-computed results, and the spec parser."""

import dataclasses
import pickle

import grain
import numpy as np
import pytest
from PIL import Image

from jaxclf.data import ops, sources


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
    out = ops.ResizeSmall(size).map({"image": _arange_image(*shape)})["image"]
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
    out = crop.random_map({"image": image}, _rng(3))["image"]
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
    out = ops.InceptionCrop(8, scale=(1.0, 1.0), ratio=(4.0, 4.0)).random_map({"image": image}, _rng(0))["image"]
    expected = np.asarray(Image.fromarray(np.ascontiguousarray(image[6:10])).resize((8, 8), Image.BILINEAR))
    np.testing.assert_array_equal(out, expected)


def _decode(path) -> dict:
    return ops.Decode().map({"path": str(path), "label": np.int32(5)})


def test_decode_grayscale_and_rgba_png_to_rgb(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray).save(tmp_path / "gray.png")
    out = _decode(tmp_path / "gray.png")
    assert set(out) == {"image", "label"} and out["label"] == 5
    assert out["image"].dtype == np.uint8
    np.testing.assert_array_equal(out["image"], np.stack([gray] * 3, axis=-1))

    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 0
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(_decode(tmp_path / "rgba.png")["image"], rgba[..., :3])


def test_decode_applies_the_exif_orientation(tmp_path):
    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:, 16:] = 255  # dark left half, bright right half, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(stored).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    image = _decode(tmp_path / "photo.jpg")["image"]
    assert image.shape == (32, 16, 3) and image.dtype == np.uint8
    assert image[:12].mean() < 30 and image[-12:].mean() > 225  # the left edge is now the top


def test_decode_error_names_the_file(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(sources.DataError, match="broken.jpg"):
        _decode(tmp_path / "broken.jpg")


def test_parse_ops_builds_the_named_ops_in_order():
    parsed = ops.parse_ops(
        "decode | inception_crop(224, scale=(0.08, 1.0))|flip_lr|resize_small(256, method='bicubic')"
    )
    assert parsed == [
        ops.Decode(),
        ops.InceptionCrop(224, scale=(0.08, 1.0)),
        ops.FlipLr(0.5),
        ops.ResizeSmall(256, method="bicubic"),
    ]
    assert pickle.loads(pickle.dumps(parsed)) == parsed  # grain ships ops to worker processes


@pytest.mark.parametrize(
    "spec, message",
    [
        ("decode|rotate(3)", r"unknown op 'rotate'.*known ops: central_crop, decode, flip_lr"),
        ("central_crop", "central_crop"),
        ("central_crop(0)", "central_crop"),
        ("central_crop('a')", "central_crop"),
        ("flip_lr(p=2)", "flip_lr"),
        ("inception_crop(8, scale=(1.0, 0.5))", "inception_crop"),
        ("resize(8, method='area')", "resize"),
        ("resize(size=8, colour=1)", "resize"),
        ("resize(__import__('os').getpid())", "resize"),  # arguments are literals, never evaluated code
        ("decode||flip_lr", "cannot parse"),
        ("decode.x", "cannot parse"),
    ],
)
def test_parse_ops_errors_name_the_op(spec, message):
    with pytest.raises(ValueError, match=message):
        ops.parse_ops(spec)


def test_register_op_adds_an_op_to_the_parser(monkeypatch):
    monkeypatch.setattr(ops, "_OPS", dict(ops._OPS))

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
