"""Hyper-parameter search on Optuna: Bayesian (TPE), random, grid or CMA-ES sampling and early pruning.

    python -m launch.search run --config CFG --space 'optim.lr=loguniform(1e-4,1e-1)' --trials 24 \\
        --base runs/search1 [--parallel K] [--sampler tpe] [--pruner asha] -- --config.data.root=/data/pets
    python -m launch.search submit ... (the same, plus the cluster flags of launch.slurm)
    python -m launch.search summary runs/search1

A space is FIELD=DISTRIBUTION per `--space` (uniform, loguniform, int, logint, choice; see
launch/space.py), or a file FILE.py whose get_search() gives `space` and any of the options below
(configs/search_small_folder.py). Flags after `--` are fixed for every trial. Everything is
checked against the config before the first trial. `run` starts K local workers and returns when
the study is finished; `submit` sends a SLURM job array of K workers. Each trial is an ordinary
jaxclf.train workdir BASE/trial_NNNN; the study lives in BASE/journal.log (or --storage URL).
Running the same command again continues the study; a trial whose worker was killed is resumed
from its checkpoint by the next worker.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import warnings

import optuna
from optuna.trial import TrialState

from jaxclf import config as config_lib
from jaxclf.training import resolve
from launch import runs, slurm, space as space_lib, study as study_lib, worker as worker_lib

# Options a search file's get_search() may set besides `space` and `overrides`; flags win over it.
OPTIONS = ("trials", "sampler", "seed", "startup_trials", "pruner", "min_resource", "reduction_factor",
           "warmup_steps", "storage", "study_name", "lease_seconds")
_DEFAULTS = {f.name: None if f.default is dataclasses.MISSING else f.default
             for f in dataclasses.fields(study_lib.Spec) if f.name in OPTIONS}


class SearchError(ValueError):
    """A mistake in the search's flags or files; the one-line message says what to change."""


def prepare(args: argparse.Namespace) -> study_lib.Spec:
    """Check everything about the search and return its spec; writes nothing."""
    items, settings = _read_space_arguments(args.space)
    fixed = [*settings.pop("overrides", ()), *config_lib.parse_override_args(args.overrides)]
    for key in OPTIONS:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    settings = {**_DEFAULTS, **settings}
    axes = space_lib.parse(items)
    config = config_lib.load_config(args.config, fixed)
    axes = space_lib.check(axes, config, fixed)
    _check_options(settings, axes)
    path, colon, arg = args.config.partition(":")  # trials run in the repository: a path from here, absolute
    return study_lib.Spec(
        config=os.path.abspath(path) + colon + arg, overrides=fixed, space=items, distributions=space_lib.to_json(axes),
        metric=resolve.best_metric(config), direction="maximize" if config.best_mode == "max" else "minimize",
        python=args.python, **settings,
    )


def _read_space_arguments(arguments: list[str]) -> tuple[dict[str, str], dict]:
    """The --space arguments: FIELD=DISTRIBUTION items and FILE.py search files -> (space, file settings)."""
    items, settings = {}, {}
    for argument in arguments:
        if argument.endswith(".py") and "=" not in argument:
            from_file = _read_search_file(argument)
            new = dict(from_file.pop("space", {}))
            settings.update(from_file)
        else:
            new = dict([space_lib.split_item(argument)])
        for field in new:
            if field in items:
                raise SearchError(f"--space: {field} is given twice")
        items.update(new)
    return items, settings


def _read_search_file(path: str) -> dict:
    """get_search() of a search file: a dict (or ConfigDict) with `space`, `overrides` and OPTIONS."""
    if not os.path.isfile(path):
        raise SearchError(f"--space {path}: no such file")
    module = config_lib.import_file(path)
    if not hasattr(module, "get_search"):
        raise SearchError(f"--space {path}: the file defines no get_search()")
    found = module.get_search()
    found = found.to_dict() if hasattr(found, "to_dict") else dict(found)
    for key in found:
        if key not in (*OPTIONS, "space", "overrides"):
            close = difflib.get_close_matches(key, (*OPTIONS, "space", "overrides"), n=1)
            raise SearchError(f"--space {path}: get_search() sets unknown key {key!r}"
                              + (f"; did you mean {close[0]!r}?" if close else ""))
    return found


def _check_options(settings: dict, axes: dict[str, space_lib.Axis]) -> None:
    if settings["sampler"] not in study_lib.SAMPLERS:
        raise SearchError(f"sampler {settings['sampler']!r}: use one of {', '.join(study_lib.SAMPLERS)}")
    if settings["pruner"] not in study_lib.PRUNERS:
        raise SearchError(f"pruner {settings['pruner']!r}: use one of {', '.join(study_lib.PRUNERS)}")
    if settings["sampler"] == "cmaes":
        for field, axis in axes.items():
            if axis.is_choice:
                raise SearchError(f"--space {field}={axis.text}: CMA-ES samples numeric ranges only; "
                                  "make it a range or use --sampler tpe")
    if settings["sampler"] == "grid":
        try:
            points = study_lib.grid_points({f: a.distribution for f, a in axes.items()})
        except ValueError as e:
            field = str(e)
            raise SearchError(f"--space {field}={axes[field].text}: the grid sampler needs choice(...) or "
                              "int(a,b) axes") from None
        size = 1
        for values in points.values():
            size *= len(values)
        if settings["trials"] is None:
            settings["trials"] = size
        elif settings["trials"] > size:
            raise SearchError(f"--trials {settings['trials']}: the grid has only {size} points")
    if settings["trials"] is None or settings["trials"] < 1:
        raise SearchError("give the budget: --trials N (N >= 1), or `trials` in the search file")
    if settings["reduction_factor"] < 2:
        raise SearchError(f"--reduction_factor {settings['reduction_factor']}: must be at least 2")
    if settings["min_resource"] is not None and settings["min_resource"] < 1:
        raise SearchError(f"--min_resource {settings['min_resource']}: must be at least 1 (steps)")
    if settings["lease_seconds"] <= 0:
        raise SearchError(f"--lease_seconds {settings['lease_seconds']}: must be positive")


def start(spec: study_lib.Spec, base: str) -> None:
    """Write BASE/search.json and create the study, or continue the one BASE holds if it is the same search."""
    os.makedirs(base, exist_ok=True)
    runs.logs_dir(base)
    with study_lib.claims_lock(base):
        old = study_lib.read_spec(base)
        if old is not None:
            changed = study_lib.differences(old, spec)
            if changed:
                raise SearchError(f"{base} holds a different search ({', '.join(changed)} differ); "
                                  "continue it with the same flags or choose a new --base")
            if old.trials != spec.trials:
                print(f"budget: {old.trials} -> {spec.trials} trials")
        try:
            study_lib.load_study(spec, base)
        except Exception as e:  # whatever Optuna or the database driver makes of a storage it cannot open
            raise SearchError(f"--storage {spec.storage!r}: {str(e).splitlines()[0]}") from None
        study_lib.write_spec(base, spec)


def run_local(base: str, parallel: int, gpus: list[str]) -> int:
    """Start `parallel` workers here (worker i on GPU gpus[i], if given) and wait for them; 75 if one was
    stopped by a signal, else 0 when all ended well, else 1."""
    workers = []
    for i in range(parallel):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpus[i]) if gpus else None
        workers.append(subprocess.Popen([sys.executable, "-m", "launch.worker", base, "--wait"],
                                        env=env, cwd=slurm.REPO))

    def forward(signum, frame):
        for w in workers:
            if w.poll() is None:
                w.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, forward)
    codes = [w.wait() for w in workers]
    if slurm.EXIT_PREEMPTED in codes:
        return slurm.EXIT_PREEMPTED
    return 0 if all(c == 0 for c in codes) else 1


def render_array_script(args: argparse.Namespace, base: str) -> str:
    """The sbatch script: a job array of `parallel` tasks, each a worker of the study in BASE."""
    header = slurm.sbatch_header(
        args, job_name=args.job_name or os.path.basename(base),
        output=os.path.join(base, "logs", "slurm-%A_%a.out"), array=f"0-{args.parallel - 1}",
    )
    command = shlex.join([args.python, "-m", "launch.worker", base])
    return "\n".join(header + slurm.sbatch_body(command)) + "\n"


def summarize(base: str) -> dict:
    """Per trial: its sampled values, best metric, status and steps used; and the study's best."""
    spec = study_lib.read_spec(base)
    if spec is None:
        raise SearchError(study_lib.not_a_search(base))
    study = study_lib.load_study(spec, base)
    mode = "max" if spec.direction == "maximize" else "min"
    rows = []
    for trial in study.get_trials(deepcopy=False):
        workdir = study_lib.trial_dir(base, trial.number)
        described = runs.describe(workdir, spec.metric, mode)
        rows.append({
            "trial": trial.number,
            **{field: trial.params.get(field) for field in spec.space},
            f"best {spec.metric}": described[f"best {spec.metric}"],
            "status": _status(trial, workdir, described["status"], spec.lease_seconds),
            "steps used": described["last step"] or 0,
        })
    finished = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    best = study.best_trial if finished else None
    return {
        "study": spec.study_name, "metric": spec.metric, "direction": spec.direction, "budget": spec.trials,
        "best_trial": {"trial": best.number, "value": best.value, "params": best.params} if best else None,
        "steps_used": sum(r["steps used"] for r in rows),
        "trials": rows,
    }


def _status(trial: optuna.trial.FrozenTrial, workdir: str, run_status: str, lease_seconds: float) -> str:
    if trial.state == TrialState.COMPLETE:
        return run_status  # done or early_stopped
    if trial.state == TrialState.PRUNED:
        return "pruned"
    if trial.state == TrialState.FAIL:
        return f"failed (exit {trial.user_attrs.get('exit_status', '?')})"
    if trial.state == TrialState.RUNNING:
        return "running" if worker_lib.Lease.held(workdir, lease_seconds) else "stopped (resumable)"
    return trial.state.name.lower()


def save_plots(base: str) -> list[str]:
    """Optimisation history, parameter importances and parallel coordinates as BASE/plots/*.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    spec = study_lib.read_spec(base)
    study = study_lib.load_study(spec, base)
    os.makedirs(os.path.join(base, "plots"), exist_ok=True)
    saved = []
    for name, plot in (("optimization_history", optuna_plots.plot_optimization_history),
                       ("param_importances", optuna_plots.plot_param_importances),
                       ("parallel_coordinate", optuna_plots.plot_parallel_coordinate)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental API; "too few trials for importances" and the like
            try:
                axes = plot(study, target_name=spec.metric)
            except (ValueError, RuntimeError) as e:  # e.g. importances need two finished trials
                print(f"no {name} plot: {e}")
                continue
        path = os.path.join(base, "plots", f"{name}.png")
        axes.figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(axes.figure)
        saved.append(path)
    return saved


def _add_search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--space", action="append", default=[],
                        help="FIELD=DISTRIBUTION (repeat), or a search file FILE.py with get_search()")
    parser.add_argument("--trials", type=int, help="the budget: trials to start (grid: default all points)")
    parser.add_argument("--base", required=True, help="the search's folder: journal, trial_NNNN workdirs, logs")
    parser.add_argument("--sampler", choices=study_lib.SAMPLERS, help="default tpe")
    parser.add_argument("--seed", type=int, help="the sampler's seed (default 0)")
    parser.add_argument("--startup_trials", type=int, help="tpe/cmaes: random trials first (default Optuna's)")
    parser.add_argument("--pruner", choices=study_lib.PRUNERS, help="default median")
    parser.add_argument("--min_resource", type=int, help="asha/hyperband: steps of the first rung")
    parser.add_argument("--reduction_factor", type=int, help="asha/hyperband: keep 1/this per rung (default 3)")
    parser.add_argument("--warmup_steps", type=int, help="median: prune no trial before this step (default 0)")
    parser.add_argument("--storage", help="a journal file or an Optuna storage URL (default BASE/journal.log)")
    parser.add_argument("--study_name", help="default 'search'")
    parser.add_argument("--lease_seconds", type=float,
                        help="a trial whose worker has not renewed its lease this long is resumed by another "
                             "(default 120)")
    parser.add_argument("overrides", nargs="*", help="after --: --config.a.b=VALUE, fixed for every trial")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.search", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="search on this machine")
    run.add_argument("--config", required=True, help="config file (FILE or FILE:ARG)")
    run.add_argument("--parallel", type=int, help="workers, i.e. trials at a time (default: one per --gpus, else 1)")
    run.add_argument("--gpus", default="", help="GPU ids, one per worker (its CUDA_VISIBLE_DEVICES), e.g. 0,1")
    run.add_argument("--python", default=sys.executable, help="the interpreter that runs trials")
    _add_search_arguments(run)
    submit = commands.add_parser("submit", help="search on SLURM: a job array of --parallel workers")
    slurm.add_cluster_arguments(submit)
    submit.add_argument("--parallel", type=int, default=4, help="array tasks, each a worker")
    _add_search_arguments(submit)
    summary = commands.add_parser("summary", help="table, summary.json and plots of a search")
    summary.add_argument("base")
    summary.add_argument("--out", help="JSON file (default BASE/summary.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    try:
        if args.command == "summary":
            return _summary(args.base, args.out)
        gpus = [g for g in getattr(args, "gpus", "").split(",") if g]
        if args.parallel is None:
            args.parallel = len(gpus) or 1
        if args.parallel < 1 or (gpus and args.parallel > len(gpus)):
            raise SearchError(f"--parallel {args.parallel}: give at least 1" + (
                f", and at most one worker per GPU of --gpus ({len(gpus)})" if gpus else ""))
        spec = prepare(args)
        base = os.path.abspath(args.base)
        if args.command == "submit":
            script = render_array_script(args, base)
            if not args.dry_run:
                start(spec, base)
            slurm.submit(script, os.path.join(base, "search.sbatch"), args.dry_run)
            return 0
        if not shutil.which(args.python):
            raise SearchError(f"--python {args.python!r}: no such interpreter")
        start(spec, base)
        code = run_local(base, args.parallel, gpus)
    except (SearchError, space_lib.SpaceError, config_lib.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(_one_line_outcome(base))
    return code


def _summary(base: str, out: str | None) -> int:
    summary = summarize(base)
    runs.print_table(summary["trials"])
    best = summary["best_trial"]
    if best:
        print(f"best: trial {best['trial']}, {summary['metric']} {best['value']:.4g}: "
              + " ".join(study_lib.trial_overrides(best["params"])))
    print(f"steps used: {summary['steps_used']} over {len(summary['trials'])} trials")
    with open(out or os.path.join(base, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    for path in save_plots(base):
        print(f"wrote {path}")
    return 0


def _one_line_outcome(base: str) -> str:
    summary = summarize(base)
    states = {}
    for row in summary["trials"]:
        states[row["status"]] = states.get(row["status"], 0) + 1
    counts = ", ".join(f"{n} {s}" for s, n in states.items())
    best = summary["best_trial"]
    best_text = f"; best {summary['metric']} {best['value']:.4g} (trial {best['trial']})" if best else ""
    return (f"search {base}: {len(summary['trials'])} of {summary['budget']} trials ({counts}){best_text}; "
            f"table and plots: python -m launch.search summary {base}")


if __name__ == "__main__":
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sys.exit(main())
