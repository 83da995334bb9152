"""Sources built from sources: relabelled to another class list, a subset, two joined end to end.

Continual learning needs them: the new data and the replay data speak of classes by name, and
the updated model's class list (old classes first, then new ones) decides each label. Every
combined source keeps a `repr` that identifies its content, as grain's iterator state requires.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Sequence

import numpy as np

from jaxclf.data import sources
from jaxclf.data.sources import DataError, LabelledSource


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Relabelled(LabelledSource):
    """`source` with its labels renamed into `class_names` (each class of its examples must be one of them)."""

    source: LabelledSource
    class_names: tuple[str, ...]

    @functools.cached_property
    def mapping(self) -> np.ndarray:
        """int32[len(source.class_names)]: the new label of each old one (-1: not among `class_names`)."""
        return np.asarray([self.class_names.index(n) if n in self.class_names else -1
                           for n in self.source.class_names], np.int32)

    @functools.cached_property
    def labels(self) -> np.ndarray:
        labels = self.mapping[np.asarray(self.source.labels)]
        if (labels < 0).any():
            unknown = sorted({self.source.class_names[i] for i in np.asarray(self.source.labels)[labels < 0]})
            raise DataError(f"classes {unknown[:5]} of {self.source!r} are not among {list(self.class_names)[:10]}")
        return labels

    @property
    def paths(self):
        return getattr(self.source, "paths", None)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        example = self.source[i]
        label = self.mapping[example["label"]]
        if label < 0:
            raise DataError(f"example {i} of {self.source!r} has class {self.source.class_names[example['label']]!r}, "
                            f"not among {list(self.class_names)[:10]}")
        return {**example, "label": label}

    def __repr__(self) -> str:
        return f"Relabelled({self.source!r}, {','.join(map(str, self.mapping))})"


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Subset(LabelledSource):
    """The examples `indices` of `source`, in that order."""

    source: LabelledSource
    indices: np.ndarray

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.source.class_names

    @functools.cached_property
    def labels(self) -> np.ndarray:
        return np.asarray(self.source.labels)[self.indices]

    @property
    def paths(self):
        paths = getattr(self.source, "paths", None)
        return None if paths is None else tuple(paths[i] for i in self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.source[int(self.indices[i])]

    @functools.cached_property
    def _repr(self) -> str:
        digest = hashlib.sha1(np.asarray(self.indices, np.int64).tobytes()).hexdigest()[:16]
        return f"Subset({self.source!r}, {len(self.indices)} of {len(self.source)}, sha1={digest})"

    def __repr__(self) -> str:
        return self._repr


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Concatenated(LabelledSource):
    """`parts` end to end (records of part k follow those of parts 0..k-1); all share `class_names`."""

    parts: tuple[LabelledSource, ...]

    def __post_init__(self):
        if len({tuple(p.class_names) for p in self.parts}) != 1:
            raise ValueError("Concatenated sources must share one class list (relabel them first)")

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.parts[0].class_names

    @functools.cached_property
    def _starts(self) -> np.ndarray:
        return np.cumsum([0, *map(len, self.parts)])

    @functools.cached_property
    def labels(self) -> np.ndarray:
        return np.concatenate([np.asarray(p.labels) for p in self.parts]).astype(np.int32)

    @property
    def paths(self):
        paths = [getattr(p, "paths", None) for p in self.parts]
        return None if any(p is None for p in paths) else tuple(x for p in paths for x in p)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> dict:
        part = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self.parts[part][i - int(self._starts[part])]

    def __repr__(self) -> str:
        return f"Concatenated({', '.join(map(repr, self.parts))})"


def only_classes(source: LabelledSource, names: Sequence[str]) -> Subset:
    """The examples of `source` whose class is one of `names`."""
    wanted = np.asarray([n in set(names) for n in source.class_names], bool)
    return Subset(source, np.flatnonzero(wanted[np.asarray(source.labels)]))


def class_folder(path: str) -> sources.LabelledFiles:
    """The images of `path/<class>/*` (or `path/train/<class>/*`), classes the sorted folder names."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(os.path.join(path, "train")):
        path = os.path.join(path, "train")
    if not os.path.isdir(path):
        raise DataError(f"{path}: no such folder; expected {path}/<class>/<image files>")
    name = os.path.basename(path)
    # The folder as the train, val and test split of its parent: the folder source's own listing.
    return sources.load_image_folder_splits(os.path.dirname(path), train_split=name, val_split=name,
                                            test_split=name)["train"]
