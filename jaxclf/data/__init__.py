"""Input: sources (what examples exist) -> ops (per-example work in workers) -> pipeline (grain loaders).

`load_splits(config.data)` is the one entry the trainer uses to turn the data config into sources.
"""

from __future__ import annotations

import os

import ml_collections

from jaxclf.data import combine, digits, listfile, sources, tfds_source

# Data sets that jaxclf can write to `config.data.root` itself (`config.data.prepare`).
PREPARERS = {"sklearn_digits": digits.write_digits_folder}

SOURCES = ("folder", "list", "tfds")


def load_splits(data: ml_collections.ConfigDict) -> dict[str, sources.LabelledSource]:
    """The sources named by `config.data`: {"train", "val"} and "test" where there is one, sharing one class list."""
    if data.source not in SOURCES:
        raise sources.DataError(f"config.data.source={data.source!r} is unknown; use one of {SOURCES}")
    split_names = {"train_split": data.train_split, "val_split": data.val_split, "test_split": data.test_split}
    fractions = {"val_fraction": data.val_fraction, "test_fraction": data.test_fraction}
    if data.source == "tfds":
        return _only_classes(tfds_source.load_tfds_splits(data.tfds_name, data_dir=data.root, **split_names,
                                                          **fractions), data.classes)
    if not data.root:
        raise sources.DataError(
            "config.data.root is not set: point it at a folder holding train/<class>/* images "
            "(and val/<class>/* or --config.data.val_fraction=0.1), e.g. --config.data.root=/data/pets"
        )
    root = os.path.expanduser(data.root)
    if data.prepare:
        if data.prepare not in PREPARERS:
            raise sources.DataError(f"config.data.prepare={data.prepare!r} is unknown; known: {sorted(PREPARERS)}")
        PREPARERS[data.prepare](root)
    load = sources.load_image_folder_splits if data.source == "folder" else listfile.load_list_splits
    return _only_classes(load(root, **split_names, **fractions, split_seed=data.split_seed), data.classes)


def _only_classes(splits: dict[str, sources.LabelledSource], classes) -> dict[str, sources.LabelledSource]:
    """`splits` restricted to the class names `classes` (config.data.classes; empty: all), labelled 0.. in the data's order."""
    if not classes:
        return splits
    names = splits["train"].class_names
    unknown = [c for c in classes if c not in names]
    if unknown:
        raise sources.DataError(f"config.data.classes: {unknown[:5]} are not classes of the data "
                                f"(it has {len(names)}: {', '.join(names[:10])}{', ...' if len(names) > 10 else ''})")
    kept = tuple(n for n in names if n in set(classes))
    return {split: combine.Relabelled(combine.only_classes(source, kept), kept) for split, source in splits.items()}
