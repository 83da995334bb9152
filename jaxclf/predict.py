"""Classify images with a trained run: `python -m jaxclf.predict --workdir DIR IMAGES... [--top_k 5] [--output x.csv|x.json]`.

IMAGES are files, folders (searched recursively for image files) or glob patterns. Each image
gets the run's eval preprocessing (config.json's data.pp_eval and mean/std), batches run on the
first device, and the top-k classes with their probabilities go to a console table and, with
--output, to CSV or JSON. Files that cannot be read are reported by name and skipped.

From Python:
    predictor = Predictor(load_trained("runs/pets"))
    predictions, skipped = predictor.predict_files(["cat.jpg", "dog.png"], top_k=3)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import glob
import json
import os
import sys
from collections.abc import Sequence

import numpy as np
from scipy.special import softmax

from jaxclf.runs import inference
from jaxclf.data import ops as ops_lib, sources


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The top-k classes of one image, most probable first."""

    path: str
    classes: tuple[str, ...]
    probabilities: tuple[float, ...]


class Predictor:
    """A trained model ready to classify image files or preprocessed arrays, `batch_size` at a time."""

    def __init__(self, trained: inference.TrainedModel, batch_size: int = 32):
        self.trained = trained
        self.batch_size = batch_size

    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities float32[N, C] of uint8[N, H, W, 3] images already preprocessed (load_image).

        Every call to the model has `batch_size` rows (the last batch padded), so it compiles once.
        """
        probabilities = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            padded = np.zeros((self.batch_size, *batch.shape[1:]), np.uint8)
            padded[: len(batch)] = batch
            probabilities.append(softmax(self.trained.logits(padded)[: len(batch)], axis=-1))
        return np.concatenate(probabilities) if probabilities else np.zeros((0, len(self.trained.class_names)))

    def predict_files(self, paths: Sequence[str], top_k: int = 5) -> tuple[list[Prediction], list[tuple[str, str]]]:
        """(predictions in input order, [(path, reason)] for files that could not be read or preprocessed)."""
        top_k = min(top_k, len(self.trained.class_names))
        predictions, skipped = [], []
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for start in range(0, len(paths), self.batch_size):
                chunk = paths[start : start + self.batch_size]
                loaded = list(pool.map(self._load, chunk))
                readable = [(p, image) for p, image in zip(chunk, loaded) if not isinstance(image, str)]
                skipped += [(p, reason) for p, reason in zip(chunk, loaded) if isinstance(reason, str)]
                if not readable:
                    continue
                shapes = {image.shape for _, image in readable}
                if len(shapes) > 1:
                    raise inference.WorkdirError(
                        f"the run's data.pp_eval={self.trained.config.data.pp_eval!r} leaves images of different "
                        f"sizes {sorted(shapes)}; it needs a resize or crop to a fixed size to batch them"
                    )
                probabilities = self.predict_arrays(np.stack([image for _, image in readable]))
                for (path, _), probs in zip(readable, probabilities):
                    predictions.append(Prediction(path, *top_classes(probs, self.trained.class_names, top_k)))
        return predictions, skipped

    def _load(self, path: str) -> np.ndarray | str:
        """The preprocessed image, or the reason it cannot be had."""
        try:
            return self.trained.load_image(path)
        except ops_lib.BadImage as e:
            return f"cannot decode the image ({e.reason})"
        except (sources.DataError, OSError, ValueError) as e:
            return str(e)


def top_classes(probabilities: np.ndarray, class_names: Sequence[str], k: int) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """(the k most probable classes, their probabilities) of float32[C] `probabilities`; ties keep class order."""
    top = np.argsort(-probabilities, kind="stable")[:k]
    return tuple(class_names[i] for i in top), tuple(float(probabilities[i]) for i in top)


def expand_inputs(items: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(image files named by `items`, in order without repeats; [(item, reason)] for items naming none)."""
    files, missing = [], []
    for item in items:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(dirpath, name)
                for dirpath, _, names in os.walk(item)
                for name in names
                if os.path.splitext(name)[1].lower() in sources.IMAGE_EXTENSIONS and not name.startswith(".")
            )
            reason = "a folder without image files"
        elif os.path.exists(item):
            found, reason = [item], ""
        else:
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            reason = "no such file, and no file matches it as a pattern"
        if not found:
            missing.append((item, reason))
        files += found
    return list(dict.fromkeys(files)), missing


def write_output(path: str, predictions: list[Prediction], skipped: list[tuple[str, str]]) -> None:
    """CSV (path, class_1, probability_1, ...) or JSON ({"predictions": [...], "skipped": [...]}), by extension."""
    extension = os.path.splitext(path)[1].lower()
    if extension == ".json":
        record = {
            "predictions": [
                {"path": p.path, "top_k": [{"class": c, "probability": q} for c, q in zip(p.classes, p.probabilities)]}
                for p in predictions
            ],
            "skipped": [{"path": s, "reason": reason} for s, reason in skipped],
        }
        with open(path, "w") as f:
            json.dump(record, f, indent=2)
    elif extension == ".csv":
        k = max((len(p.classes) for p in predictions), default=0)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path"] + [col for i in range(1, k + 1) for col in (f"class_{i}", f"probability_{i}")])
            for p in predictions:
                writer.writerow([p.path] + [v for pair in zip(p.classes, p.probabilities) for v in (pair[0], f"{pair[1]:.6f}")])
    else:
        raise inference.WorkdirError(f"--output {path}: name a .csv or .json file")


def format_table(predictions: list[Prediction]) -> str:
    """One line per image: the file, then `class (probability)` for each of the top k."""
    if not predictions:
        return ""
    width = min(max(len(p.path) for p in predictions), 60)
    return "\n".join(
        f"{p.path:<{width}}  " + "  ".join(f"{c} ({q:.1%})" for c, q in zip(p.classes, p.probabilities))
        for p in predictions
    )


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; exit status 0, or 2 for a mistake in the arguments, workdir or data (message on stderr)."""
    return inference.run_tool(_run, argv)


def _run(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxclf.predict", description=__doc__.splitlines()[0])
    inference.add_run_arguments(parser)
    parser.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--output", help="also write the predictions to this .csv or .json file")
    args = parser.parse_args(argv)
    if args.output and os.path.splitext(args.output)[1].lower() not in (".csv", ".json"):
        parser.error(f"--output {args.output}: name a .csv or .json file")
    paths, skipped = expand_inputs(args.images)
    predictor = Predictor(inference.load_from_args(args), batch_size=args.batch_size)
    predictions, unreadable = predictor.predict_files(paths, top_k=args.top_k)
    skipped += unreadable
    if predictions:
        print(format_table(predictions))
    for item, reason in skipped:
        print(f"skipped {item}: {reason}", file=sys.stderr)
    if args.output:
        write_output(args.output, predictions, skipped)
        print(f"wrote {args.output}", file=sys.stderr)
    if not predictions:
        print("error: no image could be classified", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
