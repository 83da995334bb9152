"""Data sources: what labelled examples exist, as grain random-access sources; image folders live here.

A file source holds only paths and labels; decoding happens later in the grain workers (ops/).
The CSV/JSONL lists (listfile.py) and TFDS data sets (tfds_source.py) build on the same pieces:
`LabelledSource` for class bookkeeping and `assemble_splits` for the train/val/test logic.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import zlib

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """A problem with the user's data; the message names the path and says what to do."""


class LabelledSource:
    """What every source offers besides `__len__`/`__getitem__`: `labels: int32[N]` indexing `class_names`."""

    labels: np.ndarray
    class_names: tuple[str, ...]

    def class_counts(self) -> dict[str, int]:
        """Number of examples per class name, in class order."""
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(n) for name, n in zip(self.class_names, counts)}


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class LabelledFiles(LabelledSource):
    """A grain random-access source of labelled image files (from a folder tree or a CSV/JSONL list)."""

    paths: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        """The `i`-th example, undecoded: {"path": str, "label": np.int32}."""
        return {"path": self.paths[i], "label": self.labels[i]}

    @functools.cached_property
    def _repr(self) -> str:
        # grain stores repr(source) in every iterator state and refuses to restore a state into a
        # loader whose source has another repr. Hash file names and labels (not the folder, so a
        # data set copied elsewhere still resumes), and cache it: the state is taken every batch.
        digest = hashlib.sha1()
        for path, label in zip(self.paths, self.labels):
            digest.update(f"{label}:{os.path.basename(path)}\n".encode())
        return f"LabelledFiles({len(self)} images, {len(self.class_names)} classes, sha1={digest.hexdigest()[:16]})"

    def __repr__(self) -> str:
        return self._repr


def load_image_folder_splits(
    root: str,
    *,
    train_split: str = "train",
    val_split: str = "val",
    test_split: str = "test",
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    split_seed: int = 0,
) -> dict[str, LabelledFiles]:
    """Read `root/<train_split>/<class>/*` and the val and test folders as {"train", "val"[, "test"]}.

    Class order is the sorted class folder names of the train split. A val (test) folder that
    does not exist is instead held out of train: `val_fraction` (`test_fraction`) of each class,
    seeded and stratified. Without a test folder and with test_fraction=0 there is no "test".
    """
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such folder; expected {root}/{train_split}/<class>/<image files>")
    where = {"train": os.path.join(root, train_split), "val": os.path.join(root, val_split),
             "test": os.path.join(root, test_split)}
    if not os.path.isdir(where["train"]):
        raise DataError(f"{where['train']}: no such folder; put the training images in {where['train']}/<class>/<image files>")
    listed = {split: _list_classes(path) if os.path.isdir(path) else None for split, path in where.items()}
    return assemble_splits(
        listed, where, tuple(sorted(listed["train"])),
        val_fraction=val_fraction, test_fraction=test_fraction, split_seed=split_seed,
    )


def assemble_splits(
    listed: dict[str, dict[str, list[str]] | None],
    where: dict[str, str],
    class_names: tuple[str, ...],
    *,
    val_fraction: float,
    test_fraction: float,
    split_seed: int,
) -> dict[str, LabelledFiles]:
    """Turn {split: {class: paths} or None if absent} into sources, holding absent val/test out of train.

    `where[split]` names each split's folder or file in errors. Classes of val/test must occur in train.
    """
    fractions = {"val": val_fraction, "test": test_fraction}
    for split, fraction in fractions.items():
        if not 0 <= fraction < 1:
            raise DataError(f"{split}_fraction={fraction} for {where['train']} must be in [0, 1)")
        if listed[split] is not None and fraction > 0:
            raise DataError(
                f"{where[split]} exists and {split}_fraction={fraction} also asks to hold out part of "
                f"{where['train']}: set {split}_fraction=0 to use it, or point {split}_split elsewhere"
            )
    if listed["val"] is None and val_fraction == 0:
        raise DataError(
            f"{where['val']}: not found; add validation images there (as for {where['train']}), "
            "or hold out part of the training images with val_fraction > 0 (e.g. 0.1)"
        )
    if val_fraction + test_fraction >= 1:
        raise DataError(f"val_fraction + test_fraction = {val_fraction + test_fraction} must stay below 1")
    for split in ("val", "test"):
        unknown = sorted(set(listed[split] or ()) - set(class_names))
        if unknown:
            raise DataError(
                f"{where[split]} has classes {unknown} that {where['train']} lacks; "
                "every evaluated class needs training images (or remove them)"
            )
    held_out = {split: f for split, f in fractions.items() if f > 0}
    parts = {"train": listed["train"], **{s: files for s, files in listed.items() if s != "train" and files}}
    if held_out:
        parts.update(_split_by_fractions(listed["train"], held_out, split_seed))
        for split in held_out:
            if not any(parts[split].values()):
                raise DataError(
                    f"{split}_fraction={held_out[split]} of {where['train']} holds out no image "
                    f"(classes too small); raise {split}_fraction"
                )
    return {split: _make_source(parts[split], class_names) for split in SPLITS if split in parts}


def _split_by_fractions(
    files: dict[str, list[str]], fractions: dict[str, float], seed: int
) -> dict[str, dict[str, list[str]]]:
    """Per class, a seeded shuffle: the first share of it to "val", the next to "test", the rest to "train".

    Every class keeps at least one training file.
    """
    parts = {"train": {}, **{split: {} for split in fractions}}
    for name, class_files in files.items():
        # A per-class seed makes each class's split independent of which other classes exist.
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        order = list(rng.permutation(len(class_files)))
        for split in ("val", "test"):
            if split in fractions:
                count = min(round(fractions[split] * len(class_files)), len(order) - 1)
                parts[split][name] = [class_files[k] for k in sorted(order[:count])]
                order = order[count:]
        parts["train"][name] = [class_files[k] for k in sorted(order)]
    return parts


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


def _make_source(files: dict[str, list[str]], class_names: tuple[str, ...]) -> LabelledFiles:
    paths = [p for name in class_names for p in files.get(name, [])]
    labels = [label for label, name in enumerate(class_names) for _ in files.get(name, [])]
    return LabelledFiles(paths=tuple(paths), labels=np.asarray(labels, np.int32), class_names=class_names)
