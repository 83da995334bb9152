"""Evaluate a trained run: `python -m jaxclf.evaluate --workdir DIR [--split val|test|PATH] [--checkpoint best|last|STEP] [--tta flip]`.

Or an exported model, `--artefact PATH` instead of `--workdir` (StableHLO, ONNX, ONNX int8; see
jaxclf.artefact): the same report, written to `PATH.eval/<split>/`, so the accuracy cost of an
export is one command.

Writes `DIR/eval/<split>/`: report.json (every metric, see report.py), report.md (readable),
confusion_matrix.png, reliability.png and predictions.csv (one row per image: file, true and
predicted class, confidence); and refreshes the training curves in `DIR/plots/`. Each image is
counted exactly once (padded, masked batches). Runs in one process, on the first device.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Sequence

import jax
import numpy as np
from scipy.special import log_softmax, logsumexp

from jaxclf import artefact as artefact_lib, continual, data as data_lib, inference, plots, report as report_lib
from jaxclf.data import pipeline, sources

TTA_MODES = ("none", "flip")


def load_split(trained: inference.LoadedModel, split: str) -> tuple[str, sources.LabelledSource]:
    """(name, source) for `split`: "train", "val" or "test" of the run's data config (a continual run's:
    its new data and the old run's images of old classes, as it trained), or a folder
    PATH/<class>/<images> whose class names are among the run's (labels follow the run's order)."""
    if split in sources.SPLITS:
        splits = continual.run_splits(trained.config, trained.workdir) or data_lib.load_splits(trained.config.data)
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


def predict_source(
    trained: inference.LoadedModel, source: sources.LabelledSource, *, batch_size: int, tta: str = "none"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log_probs float64[N, C], labels int64[N], indices int64[N]) for the readable examples of `source`.

    `indices` are the positions in `source` (an unreadable image skipped under
    data.bad_images="skip" leaves a gap). With tta="flip", probabilities of the image and its
    mirror image are averaged.
    """
    if tta not in TTA_MODES:
        raise inference.WorkdirError(f"--tta {tta}: use one of {TTA_MODES}")
    log_probs, labels, indices = [], [], []
    batches = pipeline.eval_batches(
        source, trained.config.data.pp_eval, global_batch_size=batch_size,
        num_workers=trained.config.data.num_workers, bad_images=trained.config.data.bad_images,
        max_image_pixels=trained.config.data.max_image_pixels,
    )
    for batch in batches:
        scores = log_softmax(trained.logits(batch["image"]).astype(np.float64), axis=-1)
        if tta == "flip":
            flipped = log_softmax(trained.logits(batch["image"][:, :, ::-1]).astype(np.float64), axis=-1)
            scores = logsumexp(np.stack([scores, flipped]), axis=0) - np.log(2.0)
        mask = np.asarray(batch["mask"], bool)
        log_probs.append(scores[mask])
        labels.append(np.asarray(batch["label"])[mask])
        indices.append(np.asarray(batch["index"])[mask])
    return np.concatenate(log_probs), np.concatenate(labels).astype(np.int64), np.concatenate(indices)


def evaluate(
    trained: inference.LoadedModel, split: str = "val", *, batch_size: int = 0, tta: str = "none"
) -> tuple[dict, str]:
    """Evaluate on `split`, write the report files; return (report, output folder)."""
    if jax.process_count() > 1:
        raise inference.WorkdirError("jaxclf.evaluate runs in a single process; start it without a multi-host launcher")
    name, source = load_split(trained, split)
    batch_size = batch_size or trained.config.eval_batch_size or trained.config.batch_size
    log_probs, labels, indices = predict_source(trained, source, batch_size=batch_size, tta=tta)
    report = report_lib.classification_report(log_probs, labels, list(trained.class_names))
    report.update({
        **trained.provenance, "split": name,
        "data": trained.config.data.root if split in sources.SPLITS else os.path.abspath(split),
        "model_name": trained.model_name, "format": trained.format, "tta": tta,
        "skipped_images": len(source) - len(labels),
    })
    update = continual.evaluation_report(trained.workdir, source, log_probs, labels, batch_size)
    if update is not None:
        report["continual"] = update
    out_dir = trained.eval_dir(name)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    evaluated = trained.provenance.get("artefact") or os.path.abspath(trained.workdir)
    title = f"{os.path.basename(evaluated)}, {name}, step {trained.step}"
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(report_lib.markdown_report(report, f"Evaluation: {title}"))
    plots.plot_confusion_matrix(np.asarray(report["confusion_matrix"]), report["class_names"],
                                os.path.join(out_dir, "confusion_matrix.png"), title=title)
    plots.plot_reliability(report["calibration_bins"], os.path.join(out_dir, "reliability.png"),
                           title=f"ECE {report['ece']:.4f} ({report_lib.ECE_BINS} bins)")
    _write_predictions(os.path.join(out_dir, "predictions.csv"), source, log_probs, labels, indices,
                       trained.class_names)
    if isinstance(trained, inference.TrainedModel):
        plots.plot_training_curves(trained.workdir)
    return report, out_dir


def _write_predictions(path: str, source, log_probs: np.ndarray, labels: np.ndarray, indices: np.ndarray,
                       class_names: tuple[str, ...]) -> None:
    paths = getattr(source, "paths", None)  # file sources; a TFDS record has no file name
    predicted = log_probs.argmax(axis=1)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "file", "true_class", "predicted_class", "confidence", "correct"])
        for i, label, pred, scores in zip(indices, labels, predicted, log_probs):
            writer.writerow([int(i), paths[i] if paths else "", class_names[label], class_names[pred],
                             f"{np.exp(scores[pred]):.6f}", int(label == pred)])


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; exit status 0, or 2 for a mistake in the arguments, workdir or data (message on stderr)."""
    return inference.run_tool(_run, argv)


def _run(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxclf.evaluate", description=__doc__.splitlines()[0])
    artefact_lib.add_model_arguments(parser)
    parser.add_argument("--split", default="val", help="train, val or test of the run's data, or a folder PATH/<class>/<images>")
    parser.add_argument("--tta", default="none", choices=TTA_MODES, help="flip: average with the mirrored image")
    parser.add_argument("--batch_size", type=int, default=0, help="0: the run's eval_batch_size (or batch_size)")
    args = parser.parse_args(argv)
    trained = artefact_lib.load_from_args(args)
    report, out_dir = evaluate(trained, args.split, batch_size=args.batch_size, tta=args.tta)
    print(f"top-1 {report['top1']:.2%}  top-5 {report['top5']:.2%}  loss {report['loss']:.4f}  "
          f"macro-F1 {report['macro_f1']:.4f}  balanced accuracy {report['balanced_accuracy']:.2%}  "
          f"ECE {report['ece']:.4f}  ({report['num_examples']} images, step {trained.step}, {trained.weights}, "
          f"{trained.format})")
    if "continual" in report:
        print(report_lib.continual_line(report["continual"]))
    print(f"wrote {out_dir}/report.json, report.md, confusion_matrix.png, reliability.png, predictions.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
