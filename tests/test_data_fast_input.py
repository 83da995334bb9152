"""The fast input path (jaxclf[fastjpeg]): the crop box is torchvision's, the JPEG is decoded at the
crop's scale and resampled by OpenCV; pixels stay within a stated tolerance of the exact Pillow path,
files it does not cover go the Pillow way unchanged, and the loader keeps its guarantees."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from jaxclf.data import ops, pipeline, reader, sources
from jaxclf.data.ops import fast
from jaxclf.data.sampler import GlobalBatchSampler

needs_fast = pytest.mark.skipif(not fast.AVAILABLE, reason="needs jaxclf[fastjpeg] (simplejpeg, opencv-python-headless)")


class _SameUniforms:
    """Feeds one fixed list of uniforms in [0, 1) to whichever side draws next."""

    def __init__(self, values):
        self.values, self.position = list(values), 0

    def next(self) -> float:
        self.position += 1
        return self.values[self.position - 1]

    # numpy's Generator interface, as InceptionCrop.crop_box uses it
    def uniform(self, low, high):
        return low + (high - low) * self.next()

    def integers(self, low, high):
        return low + math.floor((high - low) * self.next())


def _torchvision_box(monkeypatch, uniforms, height, width, scale, ratio):
    """torchvision's RandomResizedCrop.get_params, its torch draws replaced by `uniforms`."""

    class Draw:
        def uniform_(self, low, high):
            return torch.tensor([uniforms.uniform(float(low), float(high))], dtype=torch.float64)

    monkeypatch.setattr(torch, "empty", lambda *shape: Draw())
    monkeypatch.setattr(torch, "randint", lambda low, high, size: torch.tensor([uniforms.integers(low, high)]))
    try:
        return T.RandomResizedCrop.get_params(torch.zeros(3, height, width), list(scale), list(ratio))
    finally:
        monkeypatch.undo()


def test_crop_boxes_are_torchvision_draws_for_the_same_uniforms(monkeypatch):
    rng = np.random.default_rng(0)
    settings = [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.5, 1.0), (0.5, 2.0)), ((1.0, 1.0), (4.0, 4.0))]  # the last: fallback
    boxes = 0
    for scale, ratio in settings:
        crop = ops.InceptionCrop(224, scale=scale, ratio=ratio)
        for height, width in [(375, 500), (500, 333), (1512, 2016), (40, 300), (64, 64)]:
            for _ in range(60):
                values = rng.random(40)
                ours = crop.crop_box(height, width, _SameUniforms(values))
                theirs = _torchvision_box(monkeypatch, _SameUniforms(values), height, width, scale, ratio)
                assert ours == tuple(theirs), (height, width, scale, ratio)
                boxes += 1
    assert boxes == 900


def _photo_jpegs(root, sizes) -> list[str]:
    """scikit-image's colour photos resized to `sizes` (width, height), saved as JPEG quality 90."""
    import skimage.data

    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    paths = []
    for i, (width, height) in enumerate(sizes):
        path = str(root / f"photo{i}.jpg")
        Image.fromarray(photos[i % 3]).resize((width, height), Image.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


@needs_fast
def test_fast_crop_agrees_with_the_exact_pillow_path_and_draws_the_same_boxes(tmp_path, monkeypatch):
    paths = _photo_jpegs(tmp_path, [(500, 375), (375, 500), (500, 333), (1600, 1200)])
    fast_crop, exact_crop = ops.InceptionCrop(224), ops.InceptionCrop(224, exact=True)
    boxes, reductions = [], []
    resize_box = ops.InceptionCrop.resize_box

    def recording(self, image, box):
        boxes.append(box)
        return resize_box(self, image, box)

    monkeypatch.setattr(ops.InceptionCrop, "resize_box", recording)
    reference = ops.InceptionCrop(224)
    differences = []
    for path in paths:
        decoded = ops.Decode().map({"path": path})["image"]
        for seed in range(12):
            boxes.clear()
            out = fast_crop.crop_while_decoding({"path": path, "label": 1}, np.random.default_rng(seed))
            expected = exact_crop.random_map({"image": decoded}, np.random.default_rng(seed))["image"]
            # The box it resampled, back in full-size pixels, is the one drawn on the decoded image.
            drawn = reference.crop_box(*decoded.shape[:2], np.random.default_rng(seed))
            reduction = drawn[2] / boxes[0][2]
            reductions.append(reduction)
            assert tuple(v * reduction for v in boxes[0]) == drawn
            assert out["label"] == 1 and out["image"].shape == (224, 224, 3) and out["image"].dtype == np.uint8
            differences.append(np.abs(out["image"].astype(int) - np.asarray(expected, int)))
    assert {1, 2, 4} <= set(reductions)  # the large photo's big crops were decoded at 1/2 and 1/4 scale
    every = np.concatenate([d.ravel() for d in differences])
    # The tolerance: a Gaussian prefilter + bilinear sampling instead of Pillow's triangle filter,
    # after a DCT-domain downscale; measured 0.47 mean, 4 at the 99th percentile, 0.93 for the
    # worst crop's mean on these photos (0.31, 3 and 0.79 on the input bench's).
    assert every.mean() < 0.75 and np.percentile(every, 99) <= 6
    assert max(d.mean() for d in differences) < 1.5
    # Not straight after decode (a TFDS array, say): the full-size crop; Pillow's own filter beyond 3x.
    monkeypatch.undo()
    large = ops.Decode().map({"path": paths[-1]})["image"]
    exactly_pillow = 0
    for seed in range(8):
        ours, exact = (np.asarray(crop.random_map({"image": large}, np.random.default_rng(seed))["image"], int)
                       for crop in (fast_crop, exact_crop))
        _, _, h, w = fast_crop.crop_box(*large.shape[:2], np.random.default_rng(seed))
        if max(h, w) > 3 * 224:
            np.testing.assert_array_equal(ours, exact)
            exactly_pillow += 1
        else:
            assert np.abs(ours - exact).mean() < 1.5
    assert 0 < exactly_pillow < 8


@needs_fast
def test_warp_box_samples_the_fractional_box_as_pillow_does(tmp_path):
    ramp = np.broadcast_to((3 * np.arange(80) + 5).astype(np.uint8)[None, :, None], (60, 80, 3)).copy()
    top, left, height, width = 3.25, 5.5, 20.0, 30.0
    out = fast.warp_box(ramp, (top, left, height, width), 16)
    # Bilinear sampling of a linear ramp is exact: output pixel j's centre maps to source column
    # left + (j + 0.5) * width / 16, whose value is 3 * (that - 0.5) + 5 (pixel i's centre is i + 0.5).
    expected = 3 * (left + (np.arange(16) + 0.5) * width / 16 - 0.5) + 5
    np.testing.assert_allclose(out[:, :, 0], np.broadcast_to(expected, (16, 16)), atol=0.6)
    pillow = np.asarray(Image.fromarray(ramp).resize((32, 32), Image.BILINEAR, box=(10.5, 4.0, 26.5, 20.0)))
    warped = fast.warp_box(ramp, (4.0, 10.5, 16.0, 16.0), 32)  # an upscale: Pillow's bilinear is plain too
    np.testing.assert_allclose(warped.astype(int), pillow.astype(int), atol=1)


@needs_fast
def test_plain_jpegs_decode_to_the_same_pixels_as_pillow(tmp_path, monkeypatch):
    y, x = np.mgrid[0:300, 0:400]
    photo = np.stack([x % 256, y % 256, (x * y) % 256], -1).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "colour.jpg", quality=90)
    Image.fromarray(photo).save(tmp_path / "progressive.jpg", quality=90, progressive=True)
    Image.fromarray(photo[..., 0]).save(tmp_path / "gray.jpg", quality=90)
    cases = [(name, size) for name in ("colour", "progressive", "gray") for size in (None, 100, 40)]
    fast_images = [np.asarray(ops.Decode(size).map({"path": str(tmp_path / f"{n}.jpg")})["image"]) for n, size in cases]
    assert all(isinstance(ops.Decode().map({"path": str(tmp_path / f"{n}.jpg")})["image"], np.ndarray)
               for n, _ in cases)  # the fast decoder took them
    monkeypatch.setattr(fast, "AVAILABLE", False)
    for (name, size), fast_image in zip(cases, fast_images):
        pillow_image = np.asarray(ops.Decode(size).map({"path": str(tmp_path / f"{name}.jpg")})["image"])
        np.testing.assert_array_equal(fast_image, pillow_image, err_msg=f"{name} decode({size})")


def test_files_the_fast_decoder_does_not_take_crop_exactly_as_without_it(tmp_path):
    photo = (np.arange(48 * 64 * 3) % 241).astype(np.uint8).reshape(48, 64, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned by 90 degrees: 64 x 48
    Image.fromarray(photo).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    Image.fromarray(photo).save(tmp_path / "lossless.png")
    Image.fromarray(np.concatenate([photo, photo[..., :1]], -1), "CMYK").save(tmp_path / "print.jpg")
    crop = ops.InceptionCrop(24)
    for name in ("turned.jpg", "lossless.png", "print.jpg"):
        path = str(tmp_path / name)
        with ops.decode.open_image(path) as image_file:
            assert not image_file.fast_jpeg
            assert (image_file.height, image_file.width) == ((64, 48) if name == "turned.jpg" else (48, 64))
        for seed in range(5):
            fused = crop.crop_while_decoding({"path": path}, np.random.default_rng(seed))["image"]
            separate = crop.random_map(ops.Decode().map({"path": path}), np.random.default_rng(seed))["image"]
            np.testing.assert_array_equal(np.asarray(fused), np.asarray(separate), err_msg=name)


def test_crop_while_decoding_without_the_extra_is_the_pillow_path(tmp_path, monkeypatch):
    (path,) = _photo_jpegs(tmp_path, [(300, 200)])
    monkeypatch.setattr(fast, "AVAILABLE", False)
    crop = ops.InceptionCrop(64)
    for seed in range(5):
        fused = crop.crop_while_decoding({"path": path}, np.random.default_rng(seed))["image"]
        decoded = Image.open(path).convert("RGB")
        top, left, h, w = crop.crop_box(decoded.height, decoded.width, np.random.default_rng(seed))
        expected = decoded.crop((left, top, left + w, top + h)).resize((64, 64), Image.BILINEAR)  # torchvision's
        np.testing.assert_array_equal(np.asarray(fused), np.asarray(expected))


def _jpeg_folder(root, count: int, bad: tuple[int, ...] = ()) -> sources.LabelledFiles:
    """`count` small photos in two classes; the indices in `bad` are truncated files."""
    paths = _photo_jpegs(root, [(96 + 8 * (i % 4), 72 + 8 * (i % 3)) for i in range(count)])
    for i in bad:
        with open(paths[i], "rb") as f:
            head = f.read(400)
        with open(paths[i], "wb") as f:
            f.write(head)
    return sources.LabelledFiles(tuple(paths), np.asarray([i % 2 for i in range(count)], np.int32), ("a", "b"))


def test_the_training_loader_crops_while_decoding_skips_bad_files_and_resumes(tmp_path):
    source = _jpeg_folder(tmp_path, 12, bad=(5,))
    spec = "decode|inception_crop(32)|flip_lr"
    make = lambda: pipeline.make_train_loader(source, spec, global_batch_size=4, seed=3, num_workers=0,
                                              bad_images="skip")
    loader = make()
    assert isinstance(loader._data_source, reader.RecordIndices)  # the crop reads the records
    iterator = iter(loader)
    batches = [next(iterator) for _ in range(3)]
    # What each row must be: record then crop then flip, drawn from the sampler's stream for that row.
    sampler = GlobalBatchSampler(12, 4, 1, 3)
    crop, flip = ops.InceptionCrop(32), ops.FlipLr()
    for k in range(12):
        metadata = sampler[k]
        index, skipped = metadata.record_key, 0
        if index == 5:  # the truncated file: replaced by the next record, and counted
            index, skipped = 6, 1
        expected = flip.random_map(crop.crop_while_decoding(source[index], metadata.rng), metadata.rng)
        row = batches[k // 4]
        np.testing.assert_array_equal(row["image"][k % 4], np.asarray(expected["image"]))
        assert row["label"][k % 4] == source[index]["label"] and row["skipped"][k % 4] == skipped
    state = iterator.get_state()
    following = [next(iterator) for _ in range(2)]
    restored = iter(make())
    restored.set_state(state)
    for got, want in zip([next(restored) for _ in range(2)], following):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    # Without skipping, the bad file stops training, named.
    failing = pipeline.make_train_loader(source, spec, global_batch_size=12, seed=3, num_workers=0)
    with pytest.raises(sources.DataError, match="photo5.jpg"):
        next(iter(failing))


def test_a_state_saved_before_the_crop_moved_into_decoding_still_restores(tmp_path):
    source = _jpeg_folder(tmp_path, 8)
    old = iter(pipeline.make_train_loader(source, "decode|flip_lr|inception_crop(16)", global_batch_size=4,
                                          seed=0, num_workers=0))  # the crop second: not fused
    next(old)
    restored = iter(pipeline.make_train_loader(source, "decode|inception_crop(16)|flip_lr", global_batch_size=4,
                                               seed=0, num_workers=0))
    restored.set_state(old.get_state())  # same records, same order: grain accepts the state
    assert next(restored)["image"].shape == (4, 16, 16, 3)


_FAULTS_PER_IMAGE = """
import multiprocessing, resource, sys
import numpy as np
from jaxclf.data import ops, reader

def measure(path):
    if path:  # read one record first, as a grain worker does
        reader.DecodedSource([{"path": path, "label": 0}], ops.Decode())[0]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        batch = [np.ones(600_000, np.uint8) for _ in range(8)]  # decoded images alive together, then freed
        del batch
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 160, flush=True)

where, path = sys.argv[1:]
if where == "worker":
    worker = multiprocessing.get_context("fork").Process(target=measure, args=(path,))
    worker.start(); worker.join()
else:
    measure(path)
"""


@pytest.mark.skipif(not (hasattr(os, "confstr") and "glibc" in (os.confstr("CS_GNU_LIBC_VERSION") or "")),
                    reason="the allocator settings are glibc's")
def test_a_worker_that_reads_records_reuses_freed_image_memory_instead_of_faulting_it_in(tmp_path):
    # A 600 kB buffer is 146 pages: glibc's default thresholds fault most of them in again for every
    # image; after the reader's first record in a worker process the freed heap serves the next images.
    # The main process (the one running XLA, num_workers=0) keeps glibc's defaults.
    path = tmp_path / "a.jpg"
    Image.new("RGB", (64, 48), (10, 20, 30)).save(path)

    def faults(where, record=""):
        result = subprocess.run([sys.executable, "-c", _FAULTS_PER_IMAGE, where, record], capture_output=True,
                                text=True, check=True)
        return float(result.stdout.split()[-1])

    assert faults("worker") > 50
    assert faults("worker", str(path)) < 15  # the first batch's pages only (146 * 8 / 160 = 7.3)
    assert faults("main", str(path)) > 50
