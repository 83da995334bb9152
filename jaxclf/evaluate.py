"""Evaluate a trained run: `python -m jaxclf.evaluate --workdir DIR [--split val|test|PATH] [--checkpoint best|last|STEP] [--tta flip]`.

Or an exported model, `--artefact PATH` instead of `--workdir` (StableHLO, ONNX, TFLite, their int8; see
jaxclf.runs.artefact): the same report, written to `PATH.eval/<split>/`, so the accuracy cost of an
export is one command.

Writes `DIR/eval/<split>/`: report.json (every metric, see evaluation/report.py), report.md (readable),
confusion_matrix.png, reliability.png and predictions.csv (one row per image: file, true and
predicted class, confidence); and refreshes the training curves in `DIR/plots/`. A run with
config.trackers adds the report's numbers and files to its tracked runs (W&B, MLflow). Each image is
counted exactly once (padded, masked batches). Runs in one process, on the first device.

Or pretrained weights with no training, `--model_init WEIGHTS[,WEIGHTS...] --data.root DIR [--evals knn,fewshot]
[--config.a.b=VALUE ...]` (see jaxclf/evaluation/backbones.py): the representation evaluators on each
backbone's frozen features, over every local device; one table, rows backbones and columns metrics,
printed and written to `--out` (JSON).
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

from jaxclf import config as config_lib
from jaxclf.data import sources
from jaxclf.evaluation import (backbones, registry as eval_registry, report as report_lib,
                               splits as splits_lib)
from jaxclf.runs import artefact as artefact_lib, inference
from jaxclf.runs.predictions import TTA_MODES, predict_source
from jaxclf.tasks import base as task_base, registry as task_registry
from jaxclf.tracking import plots, trackers as trackers_lib


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
        plot_paths = plots.plot_training_curves(trained.workdir)
        report_files = [(os.path.join(out_dir, file), f"eval/{name}") for file in sorted(os.listdir(out_dir))]
        _track(trained, name, report, report_files + [(path, "plots") for path in plot_paths])
    return report, out_dir, summaries


def _track(trained: inference.TrainedModel, split_name: str, report: dict, files: list[tuple[str, str]]) -> None:
    """Add the report's numbers (as `eval/<split>/<metric>`) and files to the run's tracked runs
    (config.trackers), continued by the ids in workdir/trackers.json."""
    if not trained.config.trackers:
        return
    numbers = {key: value for key, value in report.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    with trackers_lib.start(trained.config, trained.workdir) as tracked:
        tracked.log_summary(trained.step, {"eval": {split_name: numbers}}, files)


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
    bare = parser.add_argument_group("pretrained weights with no training (instead of --workdir / --artefact)")
    bare.add_argument("--model_init", action="append", default=[], metavar="WEIGHTS",
                      help="a workdir, weights file or folder, or hub name; several comma-separated or repeated")
    bare.add_argument("--data.root", dest="data_root", default="", metavar="DIR", help="the data (config.data.root)")
    bare.add_argument("--evals", default="knn,fewshot,linear_probe",
                      help="evaluator types, comma-separated (each under config.evals.<type>)")
    bare.add_argument("--out", default="backbones.json", help="where the table of metrics goes, as JSON")
    args, rest = parser.parse_known_args(argv)
    overrides = config_lib.parse_override_args(rest)
    if args.model_init:
        if args.workdir or args.artefact:
            raise config_lib.ConfigError("give --model_init (weights with no training) or --workdir / --artefact")
        return _compare_backbones(args, overrides)
    if overrides:
        raise config_lib.ConfigError(f"--config.{overrides[0]}: config overrides go with --model_init only")
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


def _compare_backbones(args: argparse.Namespace, overrides: list[str]) -> int:
    """`--model_init` mode: the metrics of each named backbone, one table (stdout) and `args.out` (JSON)."""
    names = [name for item in args.model_init for name in item.split(",") if name]
    evals = [name for name in args.evals.split(",") if name]
    overrides = ([f"data.root={args.data_root}"] if args.data_root else []) + (
        [f"eval_batch_size={args.batch_size}"] if args.batch_size else []) + overrides
    pp_eval_given = any(o.startswith("data.pp_eval=") for o in overrides)
    results = {}
    for name in names:
        config = backbones.backbone_config(name, evals, overrides)
        results[name] = backbones.evaluate_backbone(config, pp_eval_given)
    named = list(dict.fromkeys(metric for metrics in results.values() for metric in metrics))
    # In the order --evals names the evaluators (config.evals iterates alphabetically).
    columns = sorted(named, key=lambda metric: evals.index(metric.split("/")[0]) if metric.split("/")[0] in evals
                     else len(evals))
    print(format_table(results, columns))
    record = {"data": args.data_root, "evals": evals, "overrides": overrides, "columns": columns, "backbones": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {args.out}")
    return 0


def format_table(results: dict[str, dict[str, float]], columns: list[str]) -> str:
    """A Markdown table: one row per backbone, one column per metric (blank where a backbone lacks it)."""
    def cell(value):
        if value is None:
            return ""
        return f"{int(value)}" if float(value).is_integer() else f"{value:.4f}"
    lines = ["| backbone | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    lines += [f"| {name} | " + " | ".join(cell(metrics.get(c)) for c in columns) + " |"
              for name, metrics in results.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
