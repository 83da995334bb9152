"""Check a data set before the hours of training: `python -m jaxclf.data.check ROOT` or
`python -m jaxclf.data.check --config FILE[:ARG] [--config.a.b=VALUE ...]`.

Reads every image of every split the config names (image folder, CSV/JSONL list or TFDS) through
the decode op training uses, in worker processes, and writes OUT/report.json and OUT/report.md
(the summary it also prints): unreadable files with the reason, class counts and imbalance, images
smaller than the training crop, colour modes, exact duplicates inside a split and across splits
(leakage), near-duplicates across splits. `--fast` reads only headers and end markers: what
`train` runs at start (config.data.check, `before_training`).

Exit status: 0 no problems, 1 problems found (see findings.py), 2 a mistake in the arguments, config or data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import jax
import ml_collections

from jaxclf import config as config_lib
from jaxclf.tracking import progress
from jaxclf.data import findings, load_splits, ops as ops_lib, pipeline, scan as scan_lib
from jaxclf.data.sources import DataError, LabelledFiles

CHECKS = ("fast", "full", "off")
FAST_THREADS = 8  # the fast check mostly waits on storage: threads keep several reads in flight
NEAR_DISTANCE = 5  # pHash bits; resized/re-encoded copies measured 0-4 apart, distinct photos >= 16
TRAINING_REPORT = "data_check.json"  # in a run's workdir (its report.json is evaluation's)


def training_crop_size(data: ml_collections.ConfigDict) -> int | None:
    """The side of the images training produces: the `size` of the last sizing op of config.data.pp_train
    (e.g. 224 for "decode|inception_crop(224)|flip_lr"); None if no op sets one."""
    sizes = [op.size for op in _split_ops(data, "pp_train")[1] if isinstance(getattr(op, "size", None), int)]
    return sizes[-1] if sizes else None


def decode_ops(data: ml_collections.ConfigDict, split_names: Sequence[str]) -> dict[str, ops_lib.Decode]:
    """The decode op training applies to each split: pp_train's for train, pp_eval's for val and test."""
    return {split: _split_ops(data, "pp_train" if split == "train" else "pp_eval")[0] for split in split_names}


def _split_ops(data: ml_collections.ConfigDict, field: str) -> tuple[ops_lib.Decode, list]:
    try:
        return pipeline._split_decode(data[field], data.max_image_pixels)
    except ValueError as e:
        raise config_lib.ConfigError(f"config.data.{field}: {e}") from None


def check_splits(
    splits: dict,
    data: ml_collections.ConfigDict,
    *,
    full: bool,
    workers: int,
    near_distance: int = NEAR_DISTANCE,
    process_index: int = 0,
    process_count: int = 1,
) -> dict:
    """The report (findings.build_report) of checking `splits`, loaded from the data config `data`.

    The fast check reads file headers, so it skips splits that are not files (TFDS: the records
    are decoded arrays that only decoding can check), saying so in the report.
    """
    skipped = {} if full else {
        name: "the fast check reads file headers; TFDS records are checked by the full check"
        for name, source in splits.items() if not isinstance(source, LabelledFiles)}
    scanned = {name: source for name, source in splits.items() if name not in skipped}
    scans = scan_lib.scan(scanned, decode_ops(data, list(scanned)), full=full, workers=workers,
                          process_index=process_index, process_count=process_count)
    root = os.path.abspath(os.path.expanduser(data.root)) if data.root else ""
    about = {"data": f"{data.source} {data.tfds_name or root}", "source": data.source, "root": root,
             "tfds_name": data.tfds_name}
    return findings.build_report(scanned, scans, full=full, crop_size=training_crop_size(data),
                                 near_distance=near_distance, about=about, skipped=skipped)


def before_training(data: ml_collections.ConfigDict, splits: dict, workdir: str) -> None:
    """`config.data.check` at the start of a run: unreadable images fail it (bad_images="error") or are
    reported to be skipped ("skip"); the report goes to workdir/data_check.json.

    Every JAX process checks its shard and sees the whole result, so all fail alike; process 0 writes and prints.
    """
    if data.check not in CHECKS:
        raise config_lib.ConfigError(f"config.data.check={data.check!r}: use one of {CHECKS}")
    if data.check == "off":
        return
    full = data.check == "full"
    workers = pipeline.resolve_num_workers(data.num_workers) if full else FAST_THREADS
    with progress.phase(f"checking the data ({data.check})"):
        report = check_splits(splits, data, full=full, workers=workers,
                              process_index=jax.process_index(), process_count=jax.process_count())
    path = os.path.join(workdir, TRAINING_REPORT)
    if jax.process_index() == 0:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        progress.say(one_line(report) + f" (report: {path})")
        if full and report["problems"] > len(report["unreadable"]):
            print(findings.summary(report, limit=5), file=sys.stderr)
    unreadable = report["unreadable"]
    if unreadable and data.bad_images == "error":
        named = "; ".join(f"{u['file']}: {u['reason']}" for u in unreadable[:5])
        more = f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""
        raise DataError(
            f"the data check ({data.check}) found {len(unreadable)} unreadable images: {named}{more} (all in {path}); "
            "replace or remove them, or set config.data.bad_images='skip' to train without them"
        )


def one_line(report: dict) -> str:
    """`data check (fast): N images; K unreadable (skipped); ...` for the console."""
    parts = [f"{sum(report['images'].values()):,} images", f"{len(report['unreadable'])} unreadable"]
    if "exact_duplicates" in report:
        exact = report["exact_duplicates"]
        parts += [f"{exact['within_split_groups']} duplicate groups in a split",
                  f"{exact['across_splits_groups']} shared by splits",
                  f"{report['near_duplicates']['pairs_found']} near-duplicate pairs across splits"]
    small = report["smaller_than_crop"]["count"]
    if small:
        parts.append(f"{small} smaller than the crop {report['crop_size']}")
    if report["skipped_splits"]:
        parts.append(f"not checked: {', '.join(report['skipped_splits'])} (TFDS; run the full check)")
    return f"data check ({report['check']}): " + "; ".join(parts)


def write_report(report: dict, out_dir: str) -> tuple[str, str]:
    """OUT/report.json and OUT/report.md; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, md_path = os.path.join(out_dir, "report.json"), os.path.join(out_dir, "report.md")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    with open(md_path, "w") as f:
        f.write(findings.summary(report, limit=100))
    return json_path, md_path


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, ml_collections.ConfigDict, str]:
    """(arguments, the data's config, the output folder) from the command line."""
    parser = argparse.ArgumentParser(prog="python -m jaxclf.data.check", description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", help="an image folder: ROOT/train/<class>/* (and val/, test/)")
    parser.add_argument("--config", help="a training config, FILE[:ARG]; --config.a.b=VALUE overrides its fields")
    parser.add_argument("--out", help="where report.json and report.md go (default: runs/<config name>[_<ARG>]/"
                        "data_check, inside the run's default workdir; for ROOT, runs/data_check_<ROOT's name>)")
    parser.add_argument("--fast", action="store_true", help="headers and end markers only, no decoding (what train runs)")
    parser.add_argument("--workers", type=int, help="worker processes (threads with --fast); "
                        f"default: the CPU count ({FAST_THREADS} threads with --fast); 0: in this process")
    parser.add_argument("--near-distance", type=int, default=NEAR_DISTANCE,
                        help=f"pHash bits (of 64) within which two images are near-duplicates (default {NEAR_DISTANCE})")
    args, rest = parser.parse_known_args(argv)
    if (args.root is None) == (args.config is None):
        parser.error("give either an image folder ROOT or --config FILE (exactly one)")
    if not 0 <= args.near_distance <= 16:
        parser.error(f"--near-distance {args.near_distance} must be in [0, 16]")
    try:
        overrides = config_lib.parse_override_args(rest)
    except config_lib.ConfigError as e:
        parser.error(str(e))
    if args.config:
        config = config_lib.load_config(args.config, overrides)
        out = args.out or os.path.join(config_lib.default_workdir(args.config), "data_check")
    else:
        config = config_lib.base_config()
        config.data.root = args.root
        for override in overrides:
            config_lib.apply_override(config, override)
        config_lib.validate(config)
        out = args.out or os.path.join("runs", "data_check_" + os.path.basename(os.path.abspath(args.root)))
    if args.workers is None:
        # Every core: unlike training, no JAX process needs one of them meanwhile.
        args.workers = FAST_THREADS if args.fast else len(os.sched_getaffinity(0))
    return args, config, out


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 clean, 1 problems found, 2 a mistake in the arguments, config or data (message on stderr)."""
    try:
        args, config, out = parse_args(sys.argv[1:] if argv is None else argv)
        with progress.phase(f"reading the data ({config.data.source} {config.data.tfds_name or config.data.root})"):
            splits = load_splits(config.data)
        report = check_splits(splits, config.data, full=not args.fast, workers=args.workers,
                              near_distance=args.near_distance)
        json_path, md_path = write_report(report, out)
    except (config_lib.ConfigError, DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(findings.summary(report))
    print(f"report: {json_path}, {md_path}", file=sys.stderr)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
