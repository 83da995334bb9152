"""Image-folder data sources: `root/<split>/<class>/*.jpg` read as grain random-access sources.

A source holds only file paths and labels; decoding happens later in the grain workers (ops.py).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import zlib

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DataError(ValueError):
    """A problem with the user's data; the message names the path and says what to do."""


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class ImageFolder:
    """A grain random-access source of labelled image files; `labels: int32[N]` index `class_names`."""

    paths: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        """The `i`-th example, undecoded: {"path": str, "label": np.int32}."""
        return {"path": self.paths[i], "label": self.labels[i]}

    def class_counts(self) -> dict[str, int]:
        """Number of examples per class name, in class order."""
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(n) for name, n in zip(self.class_names, counts)}

    @functools.cached_property
    def _repr(self) -> str:
        # grain stores repr(source) in every iterator state and refuses to restore a state into a
        # loader whose source has another repr. Hash file names and labels (not the folder, so a
        # data set copied elsewhere still resumes), and cache it: the state is taken every batch.
        digest = hashlib.sha1()
        for path, label in zip(self.paths, self.labels):
            digest.update(f"{label}:{os.path.basename(path)}\n".encode())
        return f"ImageFolder({len(self)} images, {len(self.class_names)} classes, sha1={digest.hexdigest()[:16]})"

    def __repr__(self) -> str:
        return self._repr


def load_image_folder_splits(
    root: str, *, train_split: str = "train", val_split: str = "val", val_fraction: float = 0.0, split_seed: int = 0
) -> dict[str, ImageFolder]:
    """Read `root/<train_split>/<class>/*` (and `root/<val_split>` or a held-out fraction) as {"train", "val"}.

    Class order is the sorted class folder names of the train split. Without a val folder,
    `val_fraction` of each class (a seeded, stratified split) becomes the val set.
    """
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such folder; expected {root}/{train_split}/<class>/<image files>")
    train_dir = os.path.join(root, train_split)
    if not os.path.isdir(train_dir):
        raise DataError(f"{train_dir}: no such folder; put the training images in {train_dir}/<class>/<image files>")
    train_files = _list_classes(train_dir)
    class_names = tuple(sorted(train_files))

    val_dir = os.path.join(root, val_split)
    if os.path.isdir(val_dir):
        if val_fraction > 0:
            raise DataError(
                f"{val_dir} exists and val_fraction={val_fraction} also asks to hold out part of {train_dir}: "
                "set val_fraction=0 to use the folder, or point val_split at a folder that does not exist"
            )
        val_files = _list_classes(val_dir)
        unknown = sorted(set(val_files) - set(class_names))
        if unknown:
            raise DataError(
                f"{val_dir} has class folders {unknown} that {train_dir} lacks; "
                "every validation class needs training images (or remove those folders)"
            )
        return {"train": _make_folder(train_files, class_names), "val": _make_folder(val_files, class_names)}

    if val_fraction <= 0:
        raise DataError(
            f"{val_dir}: no such folder; add validation images there as {val_dir}/<class>/<image files>, "
            "or hold out part of the training images with val_fraction > 0 (e.g. 0.1)"
        )
    if val_fraction >= 1:
        raise DataError(f"val_fraction={val_fraction} for {train_dir} must be below 1 (it is the held-out share)")
    train_part, val_part = {}, {}
    for name, files in train_files.items():
        # A per-class seed makes each class's split independent of which other classes exist.
        rng = np.random.default_rng([split_seed, zlib.crc32(name.encode())])
        order = rng.permutation(len(files))
        num_val = min(round(val_fraction * len(files)), len(files) - 1)
        val_part[name] = [files[k] for k in sorted(order[:num_val])]
        train_part[name] = [files[k] for k in sorted(order[num_val:])]
    if not any(val_part.values()):
        raise DataError(
            f"val_fraction={val_fraction} of {train_dir} holds out no image (classes too small); raise val_fraction"
        )
    return {"train": _make_folder(train_part, class_names), "val": _make_folder(val_part, class_names)}


def _list_classes(split_dir: str) -> dict[str, list[str]]:
    """Map each class folder of `split_dir` to its sorted image paths (searched recursively)."""
    files = {}
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        files[entry.name] = _list_images(entry.path)
        if not files[entry.name]:
            raise DataError(
                f"{entry.path} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
            )
    if not files:
        raise DataError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<image files>")
    return files


def _list_images(class_dir: str) -> list[str]:
    """Sorted image paths under `class_dir`, skipping hidden files and folders (.DS_Store, .ipynb_checkpoints)."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        paths += [
            os.path.join(dirpath, f)
            for f in filenames
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
        ]
    return sorted(paths)


def _make_folder(files: dict[str, list[str]], class_names: tuple[str, ...]) -> ImageFolder:
    paths = [p for name in class_names for p in files.get(name, [])]
    labels = [label for label, name in enumerate(class_names) for _ in files.get(name, [])]
    return ImageFolder(paths=tuple(paths), labels=np.asarray(labels, np.int32), class_names=class_names)
