"""The run directories of a sweep or a search: what a run left (result.json, metrics.jsonl), read the same way.

Every run of `launch.sweep` and `launch.search` is an ordinary `jaxclf.train` workdir inside the
sweep's or search's folder BASE; its logs go to BASE/logs. A finished run has result.json (status
"done", "early_stopped" or "pruned", its last step and its best value of config.best_metric);
an unfinished one only metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import re

FINISHED = ("done", "early_stopped", "pruned")


def run_name(overrides: list[str]) -> str:
    """A folder name from overrides: 'optim.lr=1e-3 model.x=0' -> 'lr=1e-3,x=0'."""
    parts = [f"{field.rsplit('.', 1)[-1]}={value}" for field, _, value in (o.partition("=") for o in overrides)]
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", ",".join(parts)) or "default"


def logs_dir(base: str) -> str:
    """BASE/logs, created (SLURM does not create the folders of its log files)."""
    path = os.path.join(base, "logs")
    os.makedirs(path, exist_ok=True)
    return path


def read_metrics(workdir: str) -> list[dict]:
    """The records of workdir/metrics.jsonl ([] before the first log step)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_result(workdir: str) -> dict | None:
    """workdir/result.json, or None while the run has not finished."""
    path = os.path.join(workdir, "result.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def describe(workdir: str, metric: str, mode: str) -> dict:
    """A run's best `metric` (and its step), the last step it reached, and its status."""
    records = read_metrics(workdir)
    scored = [r for r in records if metric in r]
    pick = max if mode == "max" else min
    best = pick(scored, key=lambda r: r[metric]) if scored else None
    result = read_result(workdir)
    if result:
        status = result["status"]
    else:
        status = "started" if records else "not started"
    return {
        f"best {metric}": best[metric] if best else None,
        "best step": best["step"] if best else None,
        "last step": max((r["step"] for r in records), default=None),
        "status": status,
    }


def print_table(rows: list[dict]) -> None:
    """Rows of equal keys as aligned columns."""
    if not rows:
        print("no runs")
        return
    columns = list(rows[0])
    cells = [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
