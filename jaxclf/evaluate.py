"""Evaluate a trained run: `python -m jaxclf.evaluate --workdir DIR [--split val|test|PATH] [--checkpoint best|last|STEP] [--tta flip]`.

Or an exported model, `--artefact PATH` instead of `--workdir` (StableHLO, ONNX, TFLite, their int8; see
jaxclf.runs.artefact): the same report, written to `PATH.eval/<split>/`, so the accuracy cost of an
export is one command.

Writes `DIR/eval/<split>/`: report.json (every metric, see evaluation/report.py), report.md (readable),
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

from jaxclf.data import sources
from jaxclf.evaluation import registry as eval_registry, report as report_lib, splits as splits_lib
from jaxclf.runs import artefact as artefact_lib, inference
from jaxclf.runs.predictions import TTA_MODES, predict_source
from jaxclf.tasks import base as task_base, registry as task_registry
from jaxclf.tracking import plots


def evaluate(
    trained: inference.LoadedModel, split: str = "val", *, batch_size: int = 0, tta: str = "none"
) -> tuple[dict, str, dict[str, str]]:
    """Evaluate on `split`, write the report files; return (report, output folder, {heading: summary line}).

    The report: every metric of `report.classification_report`, the sections the run's tasks add
    (a continual run's old and new classes), and for a run's checkpoint (not an artefact) "evaluators":
    the metrics of the run's configured evaluators (config.evals), named as training logged them.
    """
    if jax.process_count() > 1:
        raise inference.WorkdirError("jaxclf.evaluate runs in a single process; start it without a multi-host launcher")
    name, source = splits_lib.load_split(trained, split)
    batch_size = batch_size or trained.config.eval_batch_size or trained.config.batch_size
    log_probs, labels, indices = predict_source(trained, source, batch_size=batch_size, tta=tta)
    report = report_lib.classification_report(log_probs, labels, list(trained.class_names))
    report.update({
        **trained.provenance, "split": name,
        "data": trained.config.data.root if split in sources.SPLITS else os.path.abspath(split),
        "model_name": trained.model_name, "format": trained.format, "tta": tta,
        "skipped_images": len(source) - len(labels),
    })
    run_tasks = task_registry.reopen(trained.config, trained.workdir)
    for task in run_tasks:
        report.update(task.report_sections(source, log_probs, labels, batch_size))
    if isinstance(trained, inference.TrainedModel):
        groups = {group: ids for task in run_tasks for group, ids in task.eval_groups().items()}
        report["evaluators"] = task_base.fold(
            run_tasks, "eval_metrics", eval_registry.run_on(trained, splits_lib.run_splits(trained), groups))
    summaries = {heading: line for task in run_tasks for heading, line in task.summary_lines(report).items()}
    out_dir = trained.eval_dir(name)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    evaluated = trained.provenance.get("artefact") or os.path.abspath(trained.workdir)
    title = f"{os.path.basename(evaluated)}, {name}, step {trained.step}"
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(report_lib.markdown_report(report, f"Evaluation: {title}", summaries))
    plots.plot_confusion_matrix(np.asarray(report["confusion_matrix"]), report["class_names"],
                                os.path.join(out_dir, "confusion_matrix.png"), title=title)
    plots.plot_reliability(report["calibration_bins"], os.path.join(out_dir, "reliability.png"),
                           title=f"ECE {report['ece']:.4f} ({report_lib.ECE_BINS} bins)")
    _write_predictions(os.path.join(out_dir, "predictions.csv"), source, log_probs, labels, indices,
                       trained.class_names)
    if isinstance(trained, inference.TrainedModel):
        plots.plot_training_curves(trained.workdir)
    return report, out_dir, summaries


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
    report, out_dir, summaries = evaluate(trained, args.split, batch_size=args.batch_size, tta=args.tta)
    print(f"accuracy {report['accuracy']:.2%}  top-5 {report['top5']:.2%}  loss {report['loss']:.4f}  "
          f"macro-F1 {report['macro_f1']:.4f}  balanced accuracy {report['balanced_accuracy']:.2%}  "
          f"ECE {report['ece']:.4f}  ({report['num_examples']} images, step {trained.step}, {trained.weights}, "
          f"{trained.format})")
    for line in summaries.values():
        print(line)
    print(f"wrote {out_dir}/report.json, report.md, confusion_matrix.png, reliability.png, predictions.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
