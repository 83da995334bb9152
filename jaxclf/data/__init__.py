"""Input: sources (what examples exist) -> ops (per-example work in workers) -> pipeline (grain loaders).

`load_splits(config.data)` is the one entry the trainer uses to turn the data config into sources.
"""

from __future__ import annotations

import os

import ml_collections

from jaxclf.data import digits, sources

# Data sets that jaxclf can write to `config.data.root` itself (`config.data.prepare`).
PREPARERS = {"sklearn_digits": digits.write_digits_folder}


def load_splits(data: ml_collections.ConfigDict) -> dict[str, sources.ImageFolder]:
    """The sources named by `config.data`: {"train": ..., "val": ...}, each with the same class list."""
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
    return sources.load_image_folder_splits(
        root,
        train_split=data.train_split,
        val_split=data.val_split,
        val_fraction=data.val_fraction,
        split_seed=data.split_seed,
    )
