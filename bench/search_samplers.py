"""TPE against random search with the same budget and seeds: the tiny CNN on the digits, real trials.

    .venv/bin/python bench/search_samplers.py --seeds 0,1,2,3,4 --out bench/results/search_samplers_cpu.json

For each seed, two studies of `--trials` trials (`launch.search run`, one worker each, no pruning)
run side by side over the same space: TPE (its first `--startup` trials random) and random search.
Each trial's sampler is seeded from (seed, trial number) in both (study.trial_seed), so TPE's random start draws the
same points as random search's first trials: the studies differ only in the trials after it, where
TPE samples from its model of the results. Reported per seed: each study's best val/accuracy and
the mean val/accuracy of the trials after the start (TPE's modelled ones against random's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SPACE = ["--space", "optim.lr=loguniform(1e-4,1)", "--space", "model.width=int(4,64)"]
FIXED = ["--config.optim.name=adamw", "--config.total_steps=200", "--config.eval_every_epochs=1000"]


def run_pair(data: str, base: str, seed: int, trials: int, startup: int) -> dict:
    """The TPE and the random study of one seed, side by side; their trials' values in trial order."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    processes = {}
    for sampler in ("tpe", "random"):
        command = [sys.executable, "-m", "launch.search", "run", "--config", f"tests/tiny_config.py:{data}",
                   "--base", os.path.join(base, f"{sampler}_{seed}"), "--sampler", sampler, "--seed", str(seed),
                   "--startup_trials", str(startup), "--trials", str(trials), "--pruner", "none", *SPACE, "--", *FIXED]
        processes[sampler] = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True)
    values = {}
    for sampler, process in processes.items():
        output, _ = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"{sampler} study of seed {seed} failed:\n{output}")
        values[sampler] = _values(os.path.join(base, f"{sampler}_{seed}"))
    return values


def _values(base: str) -> list[float]:
    from launch import study as study_lib

    study = study_lib.load_study(study_lib.read_spec(base), base)
    return [t.value for t in study.get_trials(deepcopy=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--startup", type=int, default=4, help="TPE's random trials first")
    parser.add_argument("--base", help="where the studies go (default: a temporary folder)")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results", "search_samplers_cpu.json"))
    args = parser.parse_args()

    from jaxclf.data import digits

    base = args.base or tempfile.mkdtemp(prefix="search_samplers_")
    data = digits.write_digits_folder(os.path.join(base, "digits"), image_size=16)
    rows = []
    started = time.time()
    for seed in (int(s) for s in args.seeds.split(",")):
        values = run_pair(data, base, seed, args.trials, args.startup)
        tpe, rnd = values["tpe"], values["random"]
        rows.append({
            "seed": seed, "tpe_best": max(tpe), "random_best": max(rnd),
            "tpe_after_start_mean": sum(tpe[args.startup:]) / len(tpe[args.startup:]),
            "random_after_start_mean": sum(rnd[args.startup:]) / len(rnd[args.startup:]),
            "same_start": tpe[:args.startup] == rnd[:args.startup], "tpe": tpe, "random": rnd,
        })
        r = rows[-1]
        print(f"seed {seed}: best tpe {r['tpe_best']:.4f} random {r['random_best']:.4f}; after the start, mean "
              f"tpe {r['tpe_after_start_mean']:.4f} random {r['random_after_start_mean']:.4f}", flush=True)
    summary = {
        "seeds": len(rows),
        "tpe_best_at_least_random_best": sum(r["tpe_best"] >= r["random_best"] for r in rows),
        "tpe_after_start_mean_above_random": sum(r["tpe_after_start_mean"] > r["random_after_start_mean"] for r in rows),
        "mean_best": {s: sum(r[f"{s}_best"] for r in rows) / len(rows) for s in ("tpe", "random")},
        "mean_after_start": {s: sum(r[f"{s}_after_start_mean"] for r in rows) / len(rows) for s in ("tpe", "random")},
    }
    print("| seed | best TPE | best random | mean after start TPE | mean after start random |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['seed']} | {r['tpe_best']:.4f} | {r['random_best']:.4f} | {r['tpe_after_start_mean']:.4f} | "
              f"{r['random_after_start_mean']:.4f} |")
    print(json.dumps(summary, indent=2))
    report = {"settings": {"trials": args.trials, "startup": args.startup, "space": SPACE[1::2], "fixed": FIXED},
              "rows": rows, "summary": summary, "seconds": time.time() - started, "load": os.getloadavg()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
