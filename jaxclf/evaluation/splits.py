"""The labelled images an evaluation of a finished run reads: a split of its data, or a folder of class folders."""

from __future__ import annotations

import os

import numpy as np

from jaxclf import data as data_lib
from jaxclf.data import sources
from jaxclf.runs import inference
from jaxclf.tasks import base as task_base, registry as task_registry


def load_split(trained: inference.LoadedModel, split: str) -> tuple[str, sources.LabelledSource]:
    """(name, source) for `split`: "train", "val" or "test" of the run's data config, as its tasks adjusted
    the splits (a continual run's: its new data and the old run's images of old classes), or a folder
    PATH/<class>/<images> whose class names are among the run's (labels follow the run's order)."""
    if split in sources.SPLITS:
        splits = run_splits(trained)
        if split not in splits:
            raise inference.WorkdirError(
                f"--split {split}: the run's data ({trained.config.data.root}) has no {split} split; "
                f"it has {sorted(splits)}. Pass a folder of <class>/<images> instead"
            )
        return split, splits[split]
    if not os.path.isdir(split):
        raise inference.WorkdirError(f"--split {split}: not one of {sources.SPLITS} and not a folder")
    path = os.path.abspath(split)
    name = os.path.basename(path)
    if name in sources.SPLITS:  # keep eval/val for the run's own val split
        name = f"{os.path.basename(os.path.dirname(path))}_{name}"
    return name, _load_folder(path, trained.class_names)


def run_splits(trained: inference.LoadedModel) -> dict[str, sources.LabelledSource]:
    """The splits of the run's data config as the run's tasks adjusted them for training and evaluation."""
    return task_base.fold(task_registry.reopen(trained.config, trained.workdir), "splits",
                          data_lib.load_splits(trained.config.data), trained.workdir)


def _load_folder(path: str, class_names: tuple[str, ...]) -> sources.LabelledFiles:
    """The images of `path/<class>/` labelled by the position of <class> in the run's `class_names`."""
    # The folder as both the train and the val split of its parent: the public way to list it.
    name = os.path.basename(path)
    found = sources.load_image_folder_splits(os.path.dirname(path), train_split=name, val_split=name,
                                             test_split=name)["train"]
    unknown = sorted(set(found.class_names) - set(class_names))
    if unknown:
        raise inference.WorkdirError(
            f"--split {path}: class folders {unknown} are not classes of this run "
            f"(classes.json has {len(class_names)}: {', '.join(class_names[:10])}{', ...' if len(class_names) > 10 else ''})"
        )
    to_run = np.asarray([class_names.index(n) for n in found.class_names], np.int32)
    return sources.LabelledFiles(paths=found.paths, labels=to_run[found.labels], class_names=tuple(class_names))
