"""Sweeps of config overrides: a SLURM job array, or the same runs on one machine, and a summary table.

    python -m launch.sweep submit --base runs/sweep1 --config configs/vit_b.py \\
        --grid optim.lr=1e-3,3e-4 --grid model.drop_path_rate=0,0.1 --parallel 4 [cluster flags] [--dry_run]
    python -m launch.sweep local  --base runs/sweep1 --config configs/quickstart.py --grid optim.lr=0.1,0.05
    python -m launch.sweep summary runs/sweep1 [--metric val/accuracy] [--mode max]

`--grid FIELD=V1,V2` axes multiply (cartesian product); `--list FILE` gives one run per line
instead (space-separated FIELD=VALUE). Each run trains in BASE/<name>, where the name is built
from its overrides; BASE/sweep.json records the runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys

from launch import runs as runs_lib, slurm


def expand(grid: list[str], list_file: str | None) -> list[list[str]]:
    """Override sets, each a list of 'field=value' strings."""
    if list_file:
        with open(list_file) as f:
            return [shlex.split(line) for line in f if line.strip() and not line.lstrip().startswith("#")]
    axes = []
    for axis in grid:
        field, sep, values = axis.partition("=")
        if not sep or not values:
            raise SystemExit(f"--grid {axis!r} must look like FIELD=V1,V2")
        axes.append([f"{field}={value}" for value in values.split(",")])
    return [list(combination) for combination in itertools.product(*axes)] if axes else [[]]


def plan(base: str, runs: list[list[str]]) -> list[dict]:
    """[{name, workdir, overrides}] for every run, written to BASE/sweep.json."""
    base = os.path.abspath(base)
    entries = [{"name": runs_lib.run_name(o), "workdir": os.path.join(base, runs_lib.run_name(o)), "overrides": o} for o in runs]
    if len({e["name"] for e in entries}) != len(entries):
        raise SystemExit("two runs of the sweep would share a workdir; make the override values distinct")
    return entries


def _flags(overrides: list[str]) -> list[str]:
    return [f"--config.{o}" for o in overrides]


def render_array_script(args: argparse.Namespace, entries: list[dict]) -> str:
    """One sbatch script for the whole sweep: task i of the array trains run i."""
    base = os.path.abspath(args.base)
    header = slurm.sbatch_header(
        args,
        job_name=args.job_name or os.path.basename(base),
        output=os.path.join(base, "logs", "slurm-%A_%a.out"),
        array=f"0-{len(entries) - 1}%{args.parallel}",
    )
    workdirs = " ".join(shlex.quote(e["workdir"]) for e in entries)
    overrides = " ".join(shlex.quote(shlex.join(_flags(e["overrides"]))) for e in entries)
    command = slurm.train_command(args.config, "WORKDIR", [], args.python).replace(
        "WORKDIR", '"${WORKDIRS[$SLURM_ARRAY_TASK_ID]}" ${OVERRIDES[$SLURM_ARRAY_TASK_ID]}'
    )
    arrays = [f"WORKDIRS=({workdirs})", f"OVERRIDES=({overrides})"]
    return "\n".join(header + arrays + slurm.sbatch_body(command)) + "\n"


def run_local(args: argparse.Namespace, entries: list[dict]) -> int:
    """Train the runs on this machine, `parallel` at a time; return how many failed."""
    pending = list(entries)
    running: list[tuple[dict, subprocess.Popen]] = []
    failed = 0
    while pending or running:
        while pending and len(running) < args.parallel:
            entry = pending.pop(0)
            os.makedirs(entry["workdir"], exist_ok=True)
            command = [args.python, "-m", "jaxclf.train", "--config", args.config, "--workdir", entry["workdir"],
                       *_flags(entry["overrides"])]
            log = open(os.path.join(entry["workdir"], "train.log"), "a")
            running.append((entry, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=slurm.REPO)))
            print(f"started {entry['name']}")
        entry, process = running.pop(0)
        code = process.wait()
        failed += code != 0
        print(f"finished {entry['name']}: exit {code}")
    return failed


def summarize(base: str, metric: str, mode: str) -> list[dict]:
    """Best `metric` per run (and its step), the last step reached, and the status."""
    with open(os.path.join(base, "sweep.json")) as f:
        entries = json.load(f)["runs"]
    return [{"run": entry["name"], "overrides": " ".join(entry["overrides"]),
             **runs_lib.describe(entry["workdir"], metric, mode)} for entry in entries]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("submit", "local"):
        sub = commands.add_parser(name)
        slurm.add_cluster_arguments(sub)
        sub.add_argument("--base", required=True, help="the sweep's folder; one workdir per run inside")
        sub.add_argument("--grid", action="append", default=[], help="FIELD=V1,V2 (repeat for more axes)")
        sub.add_argument("--list", dest="list_file", help="a file with one run's overrides per line")
        sub.add_argument("--parallel", type=int, default=4, help="runs at a time")
    summary = commands.add_parser("summary")
    summary.add_argument("base")
    summary.add_argument("--metric", default="val/accuracy")
    summary.add_argument("--mode", choices=("max", "min"), default="max")
    summary.add_argument("--out", help="JSON file (default BASE/summary.json)")
    args = parser.parse_args(argv)

    if args.command == "summary":
        rows = summarize(args.base, args.metric, args.mode)
        runs_lib.print_table(rows)
        with open(args.out or os.path.join(args.base, "summary.json"), "w") as f:
            json.dump(rows, f, indent=2)
        return
    entries = plan(args.base, expand(args.grid, args.list_file))
    if not args.dry_run:
        runs_lib.logs_dir(args.base)
        with open(os.path.join(args.base, "sweep.json"), "w") as f:
            json.dump({"config": args.config, "runs": entries}, f, indent=2)
    if args.command == "local":
        sys.exit(1 if run_local(args, entries) else 0)
    script = render_array_script(args, entries)
    slurm.submit(script, os.path.join(os.path.abspath(args.base), "sweep.sbatch"), args.dry_run)


if __name__ == "__main__":
    main()
