"""How long `models.create` takes, for this checkout and optionally another (before/after a change).

Each measurement is a fresh Python process that imports jaxclf from SOURCE, builds one model with its
initialisers (`models.create(name, num_classes=1000)`, waiting for every value) and reports the seconds and
the XLA compilations it took; so nothing compiled earlier is reused. The checkouts alternate within each
round, so machine load falls on both alike. Reported: median seconds and compile count per model and checkout.

    .venv/bin/python bench/model_create.py --baseline /tmp/jaxclf_d6905d3 --rounds 3 --out bench/results/model_create_cpu.json

`--baseline` is a directory holding another checkout's `jaxclf/` (e.g. `git archive d6905d3 jaxclf | tar -x -C DIR`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

MODELS = ("resnet18", "efficientnet_b0", "mobilenetv3_small_100", "convnext_atto", "vit_tiny_patch16_224",
          "resnetv2_50x1_bit")

# Run in the child: one build, its wall time and the number of XLA compilations jax logged during it.
_CHILD = """
import json, logging, sys, time
import jax
from flax import nnx
compiles = []
class Count(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("Finished XLA compilation"):
            compiles.append(record)
jax.config.update("jax_log_compiles", True)
logger = logging.getLogger("jax")
logger.addHandler(Count()); logger.setLevel(logging.WARNING); logger.propagate = False
from jaxclf import models
start = time.perf_counter()
model = models.create(sys.argv[1], num_classes=1000)
jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
print(json.dumps({"seconds": time.perf_counter() - start, "compiles": len(compiles)}))
"""


def measure(source: str, name: str) -> dict:
    """{"seconds", "compiles"} of building `name` with the jaxclf under `source`, in a fresh process (-P: the
    current directory, maybe another checkout, does not come before `source` on sys.path)."""
    env = {**os.environ, "PYTHONPATH": source, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-P", "-c", _CHILD, name], capture_output=True, text=True, env=env,
                            check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--baseline", default="", help="a directory holding another checkout's jaxclf/ to compare")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench/results/model_create_cpu.json")
    args = parser.parse_args()
    sources = {"this": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    if args.baseline:
        sources["baseline"] = os.path.abspath(args.baseline)
    names = args.models.split(",")
    runs = {name: {label: [] for label in sources} for name in names}
    load = [os.getloadavg()]
    for round_index in range(args.rounds):
        for name in names:
            order = list(sources) if round_index % 2 == 0 else list(reversed(sources))
            for label in order:
                runs[name][label].append(measure(sources[label], name))
        load.append(os.getloadavg())
    table = {name: {label: {"seconds": statistics.median(r["seconds"] for r in results),
                            "compiles": statistics.median(r["compiles"] for r in results)}
                    for label, results in by_source.items()} for name, by_source in runs.items()}
    report = {"sources": sources, "rounds": args.rounds, "loadavg": load,
              "cpu": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "table": table, "runs": runs}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    header = f"{'model':<24}" + "".join(f"{label + ' s':>12}{label + ' compiles':>18}" for label in sources)
    print(header + ("  speed-up" if "baseline" in sources else ""))
    for name, row in table.items():
        line = f"{name:<24}" + "".join(f"{row[label]['seconds']:>12.2f}{row[label]['compiles']:>18.0f}"
                                       for label in sources)
        if "baseline" in sources:
            line += f"  {row['baseline']['seconds'] / row['this']['seconds']:>7.1f}x"
        print(line)
    print(f"load average over the run: {load[0][0]:.1f} .. {load[-1][0]:.1f} (taken under load)")


if __name__ == "__main__":
    main()
