"""CSV and JSONL lists of `filename,label` as sources: one list file per split, file names relative to a root.

A CSV has a header row naming the columns `filename` and `label` (others are ignored); a JSONL
file has one object per line with those keys. Class order is the sorted labels of the train
list, numerically when every label is an integer (so labels 0..99 keep their numbers).
"""

from __future__ import annotations

import csv
import json
import os

from jaxclf.data.sources import SPLITS, DataError, LabelledFiles, assemble_splits

LIST_EXTENSIONS = (".csv", ".jsonl")


def load_list_splits(
    root: str,
    *,
    train_split: str,
    val_split: str,
    test_split: str,
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    split_seed: int = 0,
) -> dict[str, LabelledFiles]:
    """Read the list files `<root>/<train_split>` (and val/test) as {"train", "val"[, "test"]}.

    Split names are list files relative to `root` (or absolute); a val/test name that is not an
    existing list file is held out of train by `val_fraction`/`test_fraction`, as for image folders.
    """
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such folder; config.data.root must be the folder the listed file names are relative to")
    where = {split: os.path.join(root, name) for split, name in zip(SPLITS, (train_split, val_split, test_split))}
    if not train_split.lower().endswith(LIST_EXTENSIONS):
        raise DataError(
            f"config.data.train_split={train_split!r} is not a list file: with config.data.source='list' "
            f"name a {' or '.join(LIST_EXTENSIONS)} file relative to {root}"
        )
    if not os.path.isfile(where["train"]):
        raise DataError(f"{where['train']}: no such list file (config.data.train_split)")
    # A val or test name that is not an existing list file is an absent split (held out, or none).
    listed = {
        split: _read_list(path, root) if path.lower().endswith(LIST_EXTENSIONS) and os.path.isfile(path) else None
        for split, path in where.items()
    }
    return assemble_splits(
        listed, where, _class_order(listed["train"]),
        val_fraction=val_fraction, test_fraction=test_fraction, split_seed=split_seed,
    )


def _read_list(path: str, root: str) -> dict[str, list[str]]:
    """{label: [image paths in list order]} from one CSV or JSONL file; every listed file must exist."""
    rows = _read_csv(path) if path.lower().endswith(".csv") else _read_jsonl(path)
    if not rows:
        raise DataError(f"{path} lists no images")
    files: dict[str, list[str]] = {}
    for filename, label in rows:
        files.setdefault(label, []).append(os.path.join(root, filename))
    missing = [p for paths in files.values() for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(
            f"{path} lists {len(missing)} files that do not exist, e.g. {missing[:3]}; "
            f"file names are relative to config.data.root={root}"
        )
    return files


def _read_csv(path: str) -> list[tuple[str, str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"filename", "label"} <= set(reader.fieldnames):
            raise DataError(f"{path}: the first row must name the columns filename,label; it is {reader.fieldnames}")
        rows = []
        for line, row in enumerate(reader, start=2):
            if not row["filename"] or not row["label"]:
                raise DataError(f"{path}, line {line}: empty filename or label")
            rows.append((row["filename"], row["label"].strip()))
    return rows


def _read_jsonl(path: str) -> list[tuple[str, str]]:
    rows = []
    with open(path) as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
                rows.append((str(record["filename"]), str(record["label"])))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(
                    f"{path}, line {line}: expected an object with keys filename and label ({e})"
                ) from None
    return rows


def _class_order(files: dict[str, list[str]]) -> tuple[str, ...]:
    names = list(files)
    if all(name.lstrip("-").isdigit() for name in names):
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))
