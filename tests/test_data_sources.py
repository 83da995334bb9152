"""Image-folder sources and the digits writer, on folders the tests write."""

import os
import shutil

import numpy as np
import pytest
import sklearn.datasets
from PIL import Image

from jaxclf.data import digits, sources


def _touch_image(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fmt = "JPEG" if path.lower().endswith((".jpg", ".jpeg")) else "PNG"
    Image.new("RGB", (2, 2)).save(path, format=fmt)


def _make_split(root, split: str, sizes: dict[str, int]) -> None:
    for name, n in sizes.items():
        for i in range(n):
            _touch_image(os.path.join(root, split, name, f"{i:03d}.png"))


def test_classes_labels_and_counts_skip_hidden_and_non_image_files(tmp_path):
    for rel in ["train/dog/a.png", "train/dog/b.JPG", "train/dog/nested/c.jpeg", "train/cat/d.png", "val/cat/e.png"]:
        _touch_image(str(tmp_path / rel))
    _touch_image(str(tmp_path / "train/dog/.ipynb_checkpoints/x.png"))
    _touch_image(str(tmp_path / "train/dog/._b.png"))  # macOS AppleDouble companion
    _touch_image(str(tmp_path / "train/.hidden_class/y.png"))
    (tmp_path / "train/dog/.DS_Store").write_bytes(b"\0\1")
    (tmp_path / "train/dog/notes.txt").write_text("not an image")
    (tmp_path / "train/README.md").write_text("a file beside the class folders")

    splits = sources.load_image_folder_splits(str(tmp_path))
    train, val = splits["train"], splits["val"]

    assert train.class_names == ("cat", "dog") == val.class_names
    assert [os.path.relpath(p, tmp_path) for p in train.paths] == [
        "train/cat/d.png",
        "train/dog/a.png",
        "train/dog/b.JPG",
        "train/dog/nested/c.jpeg",
    ]
    np.testing.assert_array_equal(train.labels, [0, 1, 1, 1])
    assert train.labels.dtype == np.int32
    assert train.class_counts() == {"cat": 1, "dog": 3}
    assert val.class_counts() == {"cat": 1, "dog": 0}
    example = train[2]
    assert example == {"path": train.paths[2], "label": 1} and isinstance(example["label"], np.int32)
    assert len(train) == 4


def test_val_fraction_split_is_stratified_disjoint_complete_and_seeded(tmp_path):
    sizes = {"a": 10, "b": 20, "c": 7}
    _make_split(tmp_path, "train", sizes)

    splits = sources.load_image_folder_splits(str(tmp_path), val_fraction=0.3, split_seed=1)
    train, val = splits["train"], splits["val"]

    assert val.class_counts() == {"a": 3, "b": 6, "c": 2}
    assert train.class_counts() == {"a": 7, "b": 14, "c": 5}
    assert not set(train.paths) & set(val.paths)
    all_paths = {os.path.join(tmp_path, "train", n, f"{i:03d}.png") for n, k in sizes.items() for i in range(k)}
    assert set(train.paths) | set(val.paths) == all_paths
    for split in (train, val):  # labels still follow the class folder of each file
        assert [split.class_names[y] for y in split.labels] == [p.split(os.sep)[-2] for p in split.paths]

    again = sources.load_image_folder_splits(str(tmp_path), val_fraction=0.3, split_seed=1)["val"]
    other = sources.load_image_folder_splits(str(tmp_path), val_fraction=0.3, split_seed=2)["val"]
    assert again.paths == val.paths
    assert other.paths != val.paths


def test_repr_identifies_the_data_not_its_location(tmp_path):
    # grain refuses to restore an iterator state whose source repr differs: a copied data set must
    # still resume, a changed one must not.
    _make_split(tmp_path / "a", "train", {"x": 3, "y": 2})
    _make_split(tmp_path / "a", "val", {"x": 1})
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    original = sources.load_image_folder_splits(str(tmp_path / "a"))["train"]
    assert repr(sources.load_image_folder_splits(str(tmp_path / "b"))["train"]) == repr(original)
    assert len(repr(original)) < 100

    _touch_image(str(tmp_path / "b/train/y/extra.png"))
    assert repr(sources.load_image_folder_splits(str(tmp_path / "b"))["train"]) != repr(original)


@pytest.mark.parametrize(
    "layout, kwargs, named_path",
    [
        (None, {}, ""),
        ({"val": {"a": 1}}, {}, "train"),
        ({"train": {"a": 2, "empty": 0}, "val": {"a": 1}}, {}, "train/empty"),
        ({"train": {"a": 2}, "val": {"a": 1, "b": 1}}, {}, "val"),
        ({"train": {"a": 2}}, {}, "val"),
        ({"train": {"a": 2}, "val": {"a": 1}}, {"val_fraction": 0.1}, "val"),
        ({"train": {"a": 1}}, {"val_fraction": 0.5}, "train"),
    ],
    ids=[
        "missing_root", "missing_train", "empty_class", "class_only_in_val", "no_val", "val_and_fraction",
        "nothing_held_out",
    ],
)
def test_errors_name_the_path(tmp_path, layout, kwargs, named_path):
    root = tmp_path / "data"
    for split, sizes in (layout or {}).items():
        _make_split(root, split, sizes)
        for name in sizes:
            os.makedirs(root / split / name, exist_ok=True)
            (root / split / name / ".DS_Store").write_bytes(b"")  # an empty class holds only this
    with pytest.raises(sources.DataError) as info:
        sources.load_image_folder_splits(str(root), **kwargs)
    assert str(root / named_path) in str(info.value)


def test_write_digits_folder_writes_once(tmp_path, monkeypatch):
    root = str(tmp_path / "digits")
    assert digits.write_digits_folder(root, image_size=12) == root

    splits = sources.load_image_folder_splits(root)
    assert splits["train"].class_names == tuple(str(d) for d in range(10))
    assert len(splits["train"]) + len(splits["val"]) == 1797
    assert len(splits["val"]) == 360  # sklearn rounds the 20% test share up
    assert min(splits["val"].class_counts().values()) >= 35  # stratified: about 36 per class
    pngs = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".png")]
    assert len(pngs) == 1797
    with Image.open(splits["train"].paths[0]) as img:
        assert (img.mode, img.size) == ("L", (12, 12))
        pixels = np.asarray(img)
    assert pixels.dtype == np.uint8 and pixels.max() > 200  # 0..16 was spread over 0..255

    mtimes = {p: os.stat(p).st_mtime_ns for p in pngs}
    monkeypatch.setattr(sklearn.datasets, "load_digits", lambda: pytest.fail("rewrote a complete folder"))
    assert digits.write_digits_folder(root, image_size=12) == root
    assert {p: os.stat(p).st_mtime_ns for p in pngs} == mtimes
    with pytest.raises(sources.DataError, match="image_size"):
        digits.write_digits_folder(root, image_size=16)


def test_interrupted_digits_write_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    root = tmp_path / "digits"
    saves = []

    def save_then_fail(self, fp, *args, **kwargs):
        saves.append(fp)
        if len(saves) == 50:
            raise KeyboardInterrupt
        return original_save(self, fp, *args, **kwargs)

    original_save = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        digits.write_digits_folder(str(root), image_size=8)
    assert os.listdir(tmp_path) == []  # neither `root` nor the temporary folder
