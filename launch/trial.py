"""One trial of a search in a process of its own (fresh JAX): `jaxclf.train` with a pruner listening.

    python -m launch.trial BASE NUMBER      (started by the workers of `python -m launch.search`)

Trains trial NUMBER of the search in BASE in BASE/trial_NNNN (resuming its checkpoint if it has
one) with the search's fixed overrides and the trial's sampled values. Every evaluation's value of
config.best_metric is reported to Optuna at its step; when Optuna's pruner says so, the run
checkpoints, writes result.json with status "pruned" and exits with status 4 (EXIT_PRUNED).
Other exit statuses are jaxclf.train's.
"""

from __future__ import annotations

import sys

import optuna

from jaxclf import config as config_lib, train
from jaxclf.training import resolve
from jaxclf.training.listeners import Stop
from launch import study as study_lib


class PruneTrial:
    """An evaluation listener: reports `metric` to the Optuna trial, asks the loop to stop when it is pruned."""

    def __init__(self, trial: optuna.Trial, metric: str):
        self._trial, self._metric = trial, metric
        self.pruned = False

    def on_eval(self, step: int, metrics: dict[str, float]) -> Stop | None:
        value = float(metrics[self._metric])
        self._trial.report(value, step)
        if not self._trial.should_prune():
            return None
        self.pruned = True
        return Stop("pruned", f"Pruned by the search at step {step}: {self._metric} {value:.4g} "
                              "(the trial checkpointed; its GPU goes to the next trial)")


def run_trial(base: str, number: int) -> int:
    """Train trial `number` of the search in `base`; return the exit status."""
    spec = study_lib.read_spec(base)
    study = study_lib.load_study(spec, base)
    frozen = study.get_trials(deepcopy=False)[number]
    overrides = [*spec.overrides, *study_lib.trial_overrides(frozen.params)]
    workdir = study_lib.trial_dir(base, number)
    print(f"trial {number} of {base}: --config {spec.config} " + " ".join(f"--config.{o}" for o in overrides),
          file=sys.stderr, flush=True)
    pruner: PruneTrial | None = None

    def train_it():
        nonlocal pruner
        config = config_lib.load_config(spec.config, overrides)
        pruner = PruneTrial(optuna.Trial(study, frozen._trial_id), resolve.best_metric(config))
        train.train_and_evaluate(config, workdir, listeners=[pruner])

    status = train.exit_status(train_it)
    return train.EXIT_PRUNED if status == 0 and pruner is not None and pruner.pruned else status


if __name__ == "__main__":
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sys.exit(run_trial(sys.argv[1], int(sys.argv[2])))
