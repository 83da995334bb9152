"""Images as they come: every mode Pillow opens, EXIF orientation, reduced-size JPEG decoding, and
unreadable files (an error naming the file, or skipped, replaced and counted)."""

import io
import os
import pickle
import shutil
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

from jaxclf import config as config_lib, train
from jaxclf.data import ops, pipeline, reader, sources
from jaxclf.data.sampler import GlobalBatchSampler
from jaxclf.tracking.metrics import read_metrics


def _decode(path, size=None) -> np.ndarray:
    return np.asarray(ops.Decode(size).map({"path": str(path), "label": np.int32(5)})["image"])


def test_grayscale_rgba_and_palette_become_rgb(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray).save(tmp_path / "gray.png")
    out = ops.Decode().map({"path": str(tmp_path / "gray.png"), "label": np.int32(5)})
    assert set(out) == {"image", "label"} and out["label"] == 5
    np.testing.assert_array_equal(np.asarray(out["image"]), np.stack([gray] * 3, axis=-1))

    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 0
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(_decode(tmp_path / "rgba.png"), rgba[..., :3])  # alpha dropped, as torchvision

    palette = Image.new("P", (2, 2))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 1), 1)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png", transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow warns when a palette with transparency goes straight to RGB
        image = _decode(tmp_path / "palette.png")
    np.testing.assert_array_equal(image, [[[255, 0, 0], [255, 0, 0]], [[255, 0, 0], [0, 0, 255]]])


def test_16_bit_png_is_scaled_to_8_bits(tmp_path):
    values = np.array([[0, 257], [32896, 65535]], np.uint16)  # 0, 1, 128, 255 in 8 bits
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode.startswith("I")  # Pillow opens it as 16/32-bit integers
    np.testing.assert_array_equal(_decode(tmp_path / "deep.png")[..., 0], [[0, 1], [128, 255]])
    assert _decode(tmp_path / "deep.png").shape == (2, 2, 3)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    cmyk = np.zeros((8, 8, 4), np.uint8)
    cmyk[..., 1] = cmyk[..., 2] = 255  # no cyan, full magenta and yellow, no black: red
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "print.JPG", quality=95)
    with Image.open(tmp_path / "print.JPG") as img:
        assert img.mode == "CMYK"
    image = _decode(tmp_path / "print.JPG")
    assert image.shape == (8, 8, 3)
    np.testing.assert_allclose(image.reshape(-1, 3).mean(0), [255, 0, 0], atol=3)


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:, 16:] = 255  # dark left half, bright right half, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(stored).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    for size in (None, 8):  # also through the reduced-size path (1/2 scale)
        image = _decode(tmp_path / "photo.jpg", size)
        assert image.shape[:2] == ((32, 16) if size is None else (16, 8))
        assert image[:4].mean() < 30 and image[-4:].mean() > 225  # the left edge is now the top


def test_arrays_from_a_tfds_source_become_rgb():
    gray = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
    out = ops.Decode().map({"image": gray, "label": np.int32(1)})
    np.testing.assert_array_equal(out["image"], np.concatenate([gray] * 3, axis=-1))
    rgba = np.full((2, 2, 4), 7, np.uint8)
    np.testing.assert_array_equal(ops.Decode().map({"image": rgba, "label": 0})["image"], rgba[..., :3])


def test_reduced_size_decoding_keeps_the_shorter_side_at_least_size(tmp_path):
    y, x = np.mgrid[0:600, 0:800]
    photo = np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "big.jpg", quality=95)
    Image.fromarray(photo).save(tmp_path / "big.png")
    # By hand: 600 / size is the largest possible reduction; libjpeg offers 1/2, 1/4 and 1/8.
    for size, expected in [(None, (600, 800)), (400, (600, 800)), (300, (300, 400)), (200, (300, 400)),
                           (150, (150, 200)), (100, (150, 200)), (40, (75, 100))]:
        assert _decode(tmp_path / "big.jpg", size).shape[:2] == expected, size
    assert _decode(tmp_path / "big.png", 100).shape[:2] == (600, 800)  # not a JPEG: full size
    # The reduced decode is a good downscale: close to decoding fully and resizing.
    reduced = _decode(tmp_path / "big.jpg", 150).astype(float)
    full = Image.open(tmp_path / "big.jpg").resize((200, 150), Image.BOX)
    assert np.abs(reduced - np.asarray(full, float)).mean() < 6


@pytest.mark.parametrize("kind", ["truncated", "not_an_image", "empty", "pillow_bomb"])
def test_unreadable_images_raise_bad_image_naming_the_file(tmp_path, monkeypatch, kind):
    path = tmp_path / f"{kind}.jpg"
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 99, np.uint8)).save(buffer, "JPEG")
    content = {"truncated": buffer.getvalue()[:300], "not_an_image": b"<html>", "empty": b""}
    path.write_bytes(content.get(kind, buffer.getvalue()))
    if kind == "pillow_bomb":
        # Pillow's own decompression-bomb limit is on: an image over twice the limit is refused.
        assert Image.MAX_IMAGE_PIXELS is not None
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ops.BadImage, match=str(path)) as info:
        _decode(path)
    assert info.value.name == str(path)


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(tmp_path, monkeypatch):
    """Over max_pixels (here 64 * 64 - 1) is refused before a pixel is decoded, at the limit it decodes; the
    refusal survives pickling (grain workers send it back so); the limit stays out of the op's repr (grain's state)."""
    path = tmp_path / "photo.png"
    Image.fromarray(np.full((64, 64, 3), 99, np.uint8)).save(path)
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self))
    with pytest.raises(ops.TooManyPixels, match=f"{path}.*64x64 = 4,096 pixels, over the limit of 4,095") as info:
        ops.Decode(max_pixels=64 * 64 - 1).map({"path": str(path)})
    assert not decoded and (info.value.width, info.value.height, info.value.limit) == (64, 64, 4095)
    assert pickle.loads(pickle.dumps(info.value)).reason == info.value.reason
    monkeypatch.undo()
    assert _decode(path).shape == (64, 64, 3) and ops.Decode(max_pixels=64 * 64).map({"path": str(path)})
    assert repr(ops.Decode(16, max_pixels=5)) == "Decode(size=16)"
    with pytest.raises(sources.DataError, match=r"max_image_pixels=0 \(config.data.max_image_pixels; .*\): give a positive"):
        ops.Decode(max_pixels=0)


@pytest.mark.parametrize("spec", ["decode|flip_lr", "decode|inception_crop(8)"])  # the second crops while decoding
def test_the_pixel_limit_holds_in_the_training_and_evaluation_loaders(tmp_path, spec):
    source = _files_with_bad_images(tmp_path, bad=[])  # 12 images of 4x4 pixels
    over = dict(global_batch_size=4, num_workers=0, max_image_pixels=15)
    with pytest.raises(sources.DataError, match=r"00\.png.*4x4 = 16 pixels, over the limit of 15"):
        next(iter(pipeline.make_train_loader(source, spec, seed=0, **over)))
    with pytest.raises(sources.DataError, match=r"4x4 = 16 pixels, over the limit of 15"):
        next(pipeline.eval_batches(source, "decode", **over))
    at_limit = dict(over, max_image_pixels=16)
    assert next(iter(pipeline.make_train_loader(source, spec, seed=0, **at_limit)))["image"].shape[0] == 4
    assert next(pipeline.eval_batches(source, "decode", **at_limit))["image"].shape == (4, 4, 4, 3)


def test_predict_and_evaluate_read_the_runs_pixel_limit(trained_workdir, digits_root):
    from jaxclf.runs import inference

    path = os.path.join(digits_root, "val", "0", sorted(os.listdir(os.path.join(digits_root, "val", "0")))[0])
    trained = inference.load_trained(trained_workdir)
    assert trained.load_image(path).shape == (16, 16, 3)
    with pytest.raises(ops.TooManyPixels, match="16x16 = 256 pixels, over the limit of 100"):
        trained.load_image(path, max_pixels=100)
    trained = inference.load_trained(trained_workdir)
    trained.config.data.max_image_pixels = 255  # what the run's config.json would say
    with pytest.raises(ops.TooManyPixels, match="over the limit of 255"):
        trained.load_image(path)


def _files_with_bad_images(root, bad: list[int]) -> sources.LabelledFiles:
    """12 images in 2 classes; image i has all pixels 10 * i, and the indices in `bad` are broken files."""
    os.makedirs(root, exist_ok=True)
    for i in range(12):
        path = root / f"{i:02d}.png"
        if i in bad:
            path.write_bytes(b"broken")
        else:
            Image.fromarray(np.full((4, 4, 3), 10 * i, np.uint8)).save(path)
    paths = tuple(str(root / f"{i:02d}.png") for i in range(12))
    return sources.LabelledFiles(paths, np.asarray([i // 6 for i in range(12)], np.int32), ("c0", "c1"))


def test_skip_replaces_with_the_next_readable_record_and_counts(tmp_path, capsys):
    source = _files_with_bad_images(tmp_path, bad=[3, 4, 11])
    decoded = reader.DecodedSource(source, ops.Decode(), "skip")
    ids = [int(np.asarray(decoded[i]["image"])[0, 0, 0]) // 10 for i in range(12)]
    assert ids == [0, 1, 2, 5, 5, 5, 6, 7, 8, 9, 10, 0]  # 11 wraps round to 0
    assert [int(decoded[i]["skipped"]) for i in range(12)] == [0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0, 1]
    assert decoded[3]["label"] == 0 and decoded[4]["label"] == 0 and decoded[5]["label"] == 0
    warned = capsys.readouterr().err.splitlines()
    for i in (3, 4, 11):
        assert sum(f"{i:02d}.png" in line for line in warned) == 1  # once per file, however often it is read

    evaluation = reader.DecodedSource([{**source[i], "mask": True} for i in range(12)], ops.Decode(), "skip", True)
    assert [bool(evaluation[i]["mask"]) for i in range(12)] == [i not in (3, 4, 11) for i in range(12)]

    with pytest.raises(sources.DataError, match=r"03\.png.*bad_images='skip'"):
        reader.DecodedSource(source, ops.Decode(), "error")[3]
    all_bad = _files_with_bad_images(tmp_path / "all", bad=list(range(12)))
    with pytest.raises(sources.DataError, match="12 records in a row"):
        reader.DecodedSource(all_bad, ops.Decode(), "skip")[0]
    with pytest.raises(config_lib.ConfigError, match="config.data.bad_images='ignore'"):
        reader.DecodedSource(source, ops.Decode(), "ignore")


def test_loaders_keep_full_batches_and_resume_exactly_with_skipped_images(tmp_path, num_workers=0):
    source = _files_with_bad_images(tmp_path, bad=[4])
    make = lambda: pipeline.make_train_loader(
        source, "decode|flip_lr", global_batch_size=4, seed=0, num_workers=num_workers, bad_images="skip"
    )
    iterator = iter(make())
    epoch = [next(iterator) for _ in range(3)]
    assert all(b["image"].shape == (4, 4, 4, 3) for b in epoch)
    assert sum(int(b["skipped"].sum()) for b in epoch) == 1  # the bad record was drawn once this epoch
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]
    restored = iter(make())
    restored.set_state(state)
    for got, want in zip([next(restored) for _ in range(3)], expected):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])

    batches = list(pipeline.eval_batches(source, "decode", global_batch_size=8, num_workers=num_workers,
                                         bad_images="skip"))
    masks = np.concatenate([b["mask"] for b in batches])
    assert masks.sum() == 11  # 12 images, one unreadable, none counted twice


def test_an_unreadable_image_in_a_worker_process_stops_naming_the_file(tmp_path):
    source = _files_with_bad_images(tmp_path, bad=[4])
    with pytest.raises(sources.DataError, match="04.png"):
        next(iter(pipeline.make_train_loader(source, "decode", global_batch_size=12, seed=0, num_workers=1)))


def test_training_counts_skipped_images_or_stops_naming_the_file(digits_root, tmp_path):
    root = tmp_path / "digits"
    shutil.copytree(digits_root, root)
    (root / "train" / "3" / "broken.png").write_bytes(b"\x89PNG truncated")
    config = config_lib.load_config(f"tests/tiny_config.py:{root}", ["total_steps=44", "log_every_steps=44"])
    config.data.check = "off"  # the reader's own stop, not the start-up check's (tests/test_data_check.py)
    with pytest.raises(sources.DataError, match="broken.png"):
        train.train_and_evaluate(config, str(tmp_path / "error"))

    config.data.bad_images = "skip"
    train.train_and_evaluate(config, str(tmp_path / "skip"))  # one epoch: 44 steps of 32 of the 1438 images
    train_set = sources.load_image_folder_splits(str(root))["train"]
    bad_index = train_set.paths.index(str(root / "train" / "3" / "broken.png"))
    sampler = GlobalBatchSampler(len(train_set), 32, 1, config.seed)
    draws = sum(sampler.record_at(position) == bad_index for position in range(44 * 32))
    logged = [r for r in read_metrics(str(tmp_path / "skip")) if "data/skipped_images" in r]
    assert logged[-1]["data/skipped_images"] == draws >= 1
