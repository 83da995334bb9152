"""The run's classes: `workdir/classes.json` holds class names, in label order, and counts per split.

Written by the first run in a workdir; a resumed run, and evaluation or prediction from the
workdir, check their data against it so label i always means the same class.
"""

from __future__ import annotations

import json
import os

from jaxclf.data.sources import DataError, LabelledSource

FILENAME = "classes.json"


def write_or_check(workdir: str, splits: dict[str, LabelledSource], *, write: bool = True) -> None:
    """Check the class names of `splits` against `workdir/classes.json`, or write that file if there is none.

    `write=False` (JAX processes other than 0) only checks.
    """
    class_names = list(splits["train"].class_names)
    path = os.path.join(workdir, FILENAME)
    if os.path.exists(path):
        check_class_names(workdir, class_names)
    elif write:
        record = {"class_names": class_names}
        record.update({f"{split}_counts": source.class_counts() for split, source in splits.items()})
        with open(path, "w") as f:
            json.dump(record, f, indent=2)


def load_class_names(workdir: str) -> list[str]:
    """The class names recorded in `workdir/classes.json`."""
    path = os.path.join(workdir, FILENAME)
    try:
        with open(path) as f:
            return json.load(f)["class_names"]
    except FileNotFoundError:
        raise DataError(f"{path} does not exist: is {workdir} the workdir of a training run?") from None


def check_class_names(workdir: str, class_names: list[str]) -> None:
    """Fail unless `class_names` (in order) are those recorded in `workdir/classes.json`."""
    saved = load_class_names(workdir)
    if list(class_names) != saved:
        differ = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(saved, class_names)) if a != b][:3]
        raise DataError(
            f"the data's classes differ from those {os.path.join(workdir, FILENAME)} records for this workdir "
            f"({len(saved)} recorded, {len(class_names)} now; recorded vs now: {differ or 'one list is longer'}); "
            "use the original data or a new workdir"
        )


def describe_counts(splits: dict[str, LabelledSource]) -> str:
    """A console summary of the class counts: per split the total, smallest and largest class."""
    lines = [f"{len(splits['train'].class_names)} classes"]
    for split, source in splits.items():
        counts = source.class_counts()
        present = {name: n for name, n in counts.items() if n}
        if not present:
            lines.append(f"  {split}: no images")
            continue
        smallest, largest = min(present, key=present.get), max(present, key=present.get)
        lines.append(
            f"  {split}: {sum(counts.values())} images; smallest class {smallest!r} {counts[smallest]}, "
            f"largest {largest!r} {counts[largest]} (ratio {counts[largest] / counts[smallest]:.1f})"
            + (f"; {len(counts) - len(present)} classes without images" if len(present) < len(counts) else "")
        )
    if len(splits["train"].class_names) <= 20:
        lines.append(f"  train counts: {splits['train'].class_counts()}")
    return "\n".join(lines)
