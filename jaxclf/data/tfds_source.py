"""TFDS data sets as sources, through `tfds.data_source` (ArrayRecord files read without TensorFlow).

The data set must be prepared in ArrayRecord format already (`tfds build NAME
--file_format=array_record`). TFDS's catalogue builders encode images through TensorFlow; a builder
of your own that yields encoded image bytes needs none (tests/tfds_on_disk.py). TFDS decodes
each record's image itself, so examples arrive as {"image": uint8[H, W, C], "label"} and the
`decode` op only makes them RGB (`decode(size)` cannot shrink them).
"""

from __future__ import annotations

import concurrent.futures
import functools

import numpy as np

from jaxclf.tracking import progress
from jaxclf.data.sources import SPLITS, DataError, LabelledSource


class TfdsSource(LabelledSource):
    """One split of a TFDS data set with an "image" and a ClassLabel "label" feature."""

    def __init__(self, name: str, split: str, data_dir: str | None):
        self._name, self._split, self._data_dir = name, split, data_dir
        try:
            self._source = self._open()
        except Exception as e:  # TFDS raises several types for a missing data set or split
            raise DataError(
                f"TFDS data set {name!r}, split {split!r}: {e}\n(config.data.tfds_name / *_split; prepare it with "
                f"`tfds build {name} --file_format=array_record`)"
            ) from None
        info = self._source.dataset_info
        missing = {"image", "label"} - set(info.features.keys())
        if missing:
            raise DataError(
                f"TFDS data set {name!r} has features {sorted(info.features.keys())}; "
                "jaxclf reads image classification sets with features 'image' and 'label'"
            )
        self.class_names = tuple(info.features["label"].names)
        self._description = f"{info.full_name}, split={split!r}"

    def _open(self, **kwargs):
        """`tfds.data_source` of this split (a method: the function itself does not pickle, and grain
        ships sources to its worker processes)."""
        import tensorflow_datasets as tfds  # imported here: only TFDS runs need it

        return tfds.data_source(self._name, split=self._split, data_dir=self._data_dir, download=False, **kwargs)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> dict:
        record = self._source[i]
        return {"image": record["image"], "label": np.int32(record["label"])}

    @functools.cached_property
    def labels(self) -> np.ndarray:
        """int32[N]: every record's label, read with the images left encoded (TFDS's SkipDecoding).

        Every start needs them (class counts). 3,000 records of 375x500 JPEGs: 0.8 s, against 5-5.6 s
        when each image was decoded for its label (~40 min at ImageNet's 1.28M records).
        """
        import tensorflow_datasets as tfds

        undecoded = self._open(decoders={"image": tfds.decode.SkipDecoding()})
        chunks = [list(range(start, min(start + 1024, len(self)))) for start in range(0, len(self), 1024)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            labels = pool.map(lambda keys: [record["label"] for record in undecoded.__getitems__(keys)], chunks)
            labels = progress.track(labels, f"labels of {self._description}", total=len(chunks))
            return np.asarray([label for chunk in labels for label in chunk], np.int32)

    def __repr__(self) -> str:
        # grain compares repr(source) on restore: name the data, not where it is stored.
        return f"TfdsSource({self._description}, {len(self)} records)"


def load_tfds_splits(
    name: str, *, data_dir: str, train_split: str, val_split: str, test_split: str,
    val_fraction: float, test_fraction: float,
) -> dict[str, TfdsSource]:
    """{"train", "val"[, "test"]} from the TFDS data set `name`; test only if the data set has that split.

    Split names use TFDS's syntax, so a held-out part is a slice: train_split="train[:90%]",
    val_split="train[90%:]".
    """
    if not name:
        raise DataError("config.data.source='tfds' needs config.data.tfds_name, e.g. 'cifar10' or 'oxford_iiit_pet'")
    if val_fraction or test_fraction:
        raise DataError(
            "config.data.val_fraction/test_fraction do not apply to TFDS; hold out a slice instead, e.g. "
            "--config.data.train_split='train[:90%]' --config.data.val_split='train[90%:]'"
        )
    requested = dict(zip(SPLITS, (train_split, val_split, test_split)))
    splits = {split: TfdsSource(name, requested[split], data_dir or None) for split in ("train", "val")}
    available = set(splits["train"]._source.dataset_info.splits)
    if test_split.split("[")[0] in available:
        splits["test"] = TfdsSource(name, test_split, data_dir or None)
    return splits
