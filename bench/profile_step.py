"""Where a CPU train step's time goes: one step under `jax.profiler`, thunk times summed by the op that made them.

    .venv/bin/python bench/profile_step.py --model vit_small_patch16_224 --top 30

On CPU the trace holds one event per XLA thunk (a fusion, dot, convolution or kernel-library
call). Each is matched to its line in the compiled HLO and grouped by the JAX op name in that
line's metadata ("transpose(jvp())/reduce_sum" is a reduction of the backward pass) and by its
kind (the thunk name without its number). Matmuls and convolutions run asynchronously on Eigen's
threads, so their events under-report and loop fusions running beside them over-report: a profile
says where to look; whole-step A/B runs (alternated, several rounds) say whether a change helped.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step import _jaxclf_step  # noqa: E402 - the benchmark's own step, options included


def thunk_times(trace_dir: str) -> collections.Counter:
    """Microseconds per event name in the newest trace under `trace_dir`."""
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals = collections.Counter()
    for event in events:
        if event.get("ph") == "X":
            totals[event["name"]] += event.get("dur", 0)
    return totals


def group_by_op(totals: collections.Counter, hlo: str) -> list[dict]:
    """Thunk times grouped by (JAX op name, thunk kind), largest first; thunks not in `hlo` are left out."""
    definitions = {}
    for line in hlo.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)", line)
        if match:
            definitions.setdefault(match.group(1), match.group(2))
    groups: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for name, microseconds in totals.items():
        if name not in definitions:
            continue
        op = re.search(r'op_name="([^"]*)"', definitions[name])
        key = (re.sub(r"^jit\([^)]*\)/", "", op.group(1)) if op else "-", re.sub(r"\.\d+$", "", name))
        groups[key][0] += microseconds / 1e3
        groups[key][1] += 1
    rows = [{"op": op, "kind": kind, "ms": ms, "thunks": n} for (op, kind), (ms, n) in groups.items()]
    return sorted(rows, key=lambda row: -row["ms"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()

    step, state, batch = _jaxclf_step(args.model, args.batch, args.size, "float32", jax.devices()[:1], "auto")
    step = step.lower(state, batch).compile()  # with the jit's CPU options; its HLO names the thunks
    for _ in range(2):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    step_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
        totals = thunk_times(trace_dir)
    rows = group_by_op(totals, step.as_text())
    print(f"{args.model}, {args.size} px, batch {args.batch}: step {step_s:.3f} s untraced; "
          f"{sum(row['ms'] for row in rows):.0f} ms in traced thunks")
    print(f"{'ms':>8} {'thunks':>6}  {'kind':<28} op")
    for row in rows[: args.top]:
        print(f"{row['ms']:8.1f} {row['thunks']:6d}  {row['kind']:<28} {row['op'][:100]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"settings": vars(args), "step_s": step_s, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
