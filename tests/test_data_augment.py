"""Photometric and policy augmentations against torchvision's PIL implementations, and random erasing
and normalisation against hand-computed results."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision.transforms as tvt
import torchvision.transforms.functional as tvf
from PIL import Image
from torchvision.transforms import autoaugment as tv_autoaugment

from jaxclf.data import ops
from jaxclf.data.ops import autoaugment
from jaxclf.data.normalize import normalize_images


def _photo(h: int = 24, w: int = 32) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, (x * y) % 256], -1).astype(np.uint8)


def _rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.Philox(key=seed))


def test_color_jitter_equals_torchvision_for_the_drawn_factors():
    jitter = ops.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
    reference = {
        "brightness": tvf.adjust_brightness, "contrast": tvf.adjust_contrast,
        "saturation": tvf.adjust_saturation, "hue": tvf.adjust_hue,
    }
    for seed in range(6):
        steps = jitter.draw(_rng(seed))
        assert sorted(name for name, _ in steps) == ["brightness", "contrast", "hue", "saturation"]
        for name, value in steps:
            assert (-0.1 <= value <= 0.1) if name == "hue" else (0.6 <= value <= 1.4)
        expected = Image.fromarray(_photo())
        for name, value in steps:
            expected = reference[name](expected, value)
        out = jitter.random_map({"image": _photo()}, _rng(seed))["image"]
        np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    orders = {tuple(name for name, _ in jitter.draw(_rng(s))) for s in range(50)}
    assert len(orders) > 10  # the order is random, as torchvision's
    assert ops.ColorJitter(contrast=0.5).draw(_rng(0))[0][0] == "contrast"  # zero ranges are left out


def test_hue_shift_by_hand():
    red = np.zeros((1, 1, 3), np.uint8)
    red[..., 0] = 255
    # PIL's 8-bit HSV: red has hue 0; a third of a turn (int(0.333 * 255) = 84 of 256) is green.
    shifted = np.asarray(ops.color.adjust_hue(Image.fromarray(red), 1 / 3 - 0.0001))
    assert shifted[0, 0, 1] > 240 and shifted[0, 0, 0] < 20


@pytest.mark.parametrize("name", autoaugment.NAMES)
@pytest.mark.parametrize("level", [0.3, 1.0])
def test_each_augmentation_equals_torchvision(name, level):
    tv_names = {
        "identity": "Identity", "shear_x": "ShearX", "shear_y": "ShearY", "translate_x": "TranslateX",
        "translate_y": "TranslateY", "rotate": "Rotate", "brightness": "Brightness", "color": "Color",
        "contrast": "Contrast", "sharpness": "Sharpness", "posterize": "Posterize", "solarize": "Solarize",
        "autocontrast": "AutoContrast", "equalize": "Equalize",
    }
    image = Image.fromarray(_photo())
    for value in {autoaugment.randaugment_value(name, level, 24, 32), autoaugment.trivial_augment_value(name, level)}:
        for sign in (1, -1):
            ours = autoaugment.augment(image, name, sign * value if name in autoaugment._SIGNED else value, "nearest", 0)
            theirs = tv_autoaugment._apply_op(
                image, tv_names[name], sign * value if name in autoaugment._SIGNED else value,
                interpolation=tvf.InterpolationMode.NEAREST, fill=None,
            )
            np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs), err_msg=f"{name} {value}")


def test_randaugment_magnitudes_follow_torchvision_bins():
    # torchvision's RandAugment(magnitude=k) with 31 bins is our m = k / 3 (m is on the 0..10 scale).
    space = tv_autoaugment.RandAugment()._augmentation_space(31, (24, 32))
    tv_names = {"shear_x": "ShearX", "translate_x": "TranslateX", "translate_y": "TranslateY", "rotate": "Rotate",
                "brightness": "Brightness", "posterize": "Posterize", "solarize": "Solarize"}
    for k in (0, 9, 30):
        for name, tv_name in tv_names.items():
            expected = float(space[tv_name][0][k])
            assert autoaugment.randaugment_value(name, k / 30, 24, 32) == pytest.approx(expected, rel=1e-5), name


def _candidates(image: Image.Image, values: dict[str, float]) -> list[np.ndarray]:
    outputs = []
    for name, value in values.items():
        for v in {value, -value} if name in autoaugment._SIGNED else {value}:
            outputs.append(np.asarray(autoaugment.augment(image, name, v)))
    return outputs


def test_randaugment_applies_one_of_the_14_at_magnitude_m():
    image = Image.fromarray(_photo())
    values = {name: autoaugment.randaugment_value(name, 0.9, 24, 32) for name in autoaugment.NAMES}
    candidates = _candidates(image, values)
    chosen = set()
    for seed in range(60):
        out = np.asarray(ops.RandAugment(n=1, m=9).random_map({"image": _photo()}, _rng(seed))["image"])
        matches = [k for k, c in enumerate(candidates) if np.array_equal(out, c)]
        assert matches, seed
        chosen.add(matches[0])
    assert len(chosen) >= 12  # about all of the 14 (and both signs) turn up
    np.testing.assert_array_equal(ops.RandAugment(n=0).random_map({"image": _photo()}, _rng(0))["image"], _photo())
    two = np.asarray(ops.RandAugment(n=2, m=9).random_map({"image": _photo()}, _rng(1))["image"])
    assert two.shape == (24, 32, 3) and two.dtype == np.uint8


def test_trivial_augment_applies_one_of_the_14_at_one_of_31_levels():
    image = Image.fromarray(_photo())
    candidates = []
    for level in range(31):
        candidates += _candidates(image, {n: autoaugment.trivial_augment_value(n, level / 30) for n in autoaugment.NAMES})
    for seed in range(40):
        out = np.asarray(ops.TrivialAugment().random_map({"image": _photo()}, _rng(seed))["image"])
        assert any(np.array_equal(out, c) for c in candidates), seed


def test_random_erasing_fills_one_rectangle_within_scale_and_ratio():
    image = np.full((40, 50, 3), 200, np.uint8)
    erasing = ops.RandomErasing(p=1.0, scale=(0.05, 0.2), ratio=(0.5, 2.0), value=(1, 2, 3))
    for seed in range(30):
        out = erasing.random_map({"image": image}, _rng(seed))["image"]
        erased = np.all(out == [1, 2, 3], axis=-1)
        rows, cols = np.nonzero(erased.any(1))[0], np.nonzero(erased.any(0))[0]
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert erased.sum() == h * w  # one filled rectangle, the rest untouched
        assert np.all(out[~erased] == 200)
        assert 0.04 * 2000 <= h * w <= 0.21 * 2000 and 0.4 <= h / w <= 2.5
    assert np.all(image == 200)  # the input array is not written into
    noisy = ops.RandomErasing(p=1.0, scale=(0.3, 0.3), ratio=(1.0, 1.0)).random_map({"image": image}, _rng(0))["image"]
    assert len(np.unique(noisy[noisy != 200])) > 100  # "random": uniform noise, many values
    untouched = ops.RandomErasing(p=0.0).random_map({"image": image}, _rng(0))["image"]
    assert untouched is image


def test_normalisation_on_the_device_equals_torchvision_to_tensor_and_normalize():
    # Normalisation is not a worker op: the jitted step applies config.data.mean/std to uint8 batches.
    images = np.stack([_photo(), _photo()[::-1]])
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ours = np.asarray(normalize_images(jnp.asarray(images), mean, std))
    reference = tvt.Compose([tvt.ToTensor(), tvt.Normalize(mean, std)])
    theirs = torch.stack([reference(Image.fromarray(i)) for i in images]).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert math.isclose(ours[0, 0, 0, 0], (0 / 255 - 0.485) / 0.229, rel_tol=1e-5)
