"""The Optuna side of a search: its spec (BASE/search.json), the study's storage, sampler and pruner.

Every process of a search (the command that starts it, each worker, each trial) rebuilds the same
study from BASE/search.json, so they only share files: the journal (or a database URL) and the
trial folders BASE/trial_NNNN. Nothing here imports JAX, so a worker starts in a moment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator

import numpy as np
import optuna
from optuna.storages import journal


SAMPLERS = ("tpe", "random", "grid", "cmaes")
PRUNERS = ("median", "asha", "hyperband", "none")
SPEC_FILE = "search.json"


@dataclasses.dataclass
class Spec:
    """Everything a worker needs to take part in a search, as BASE/search.json records it."""

    config: str  # FILE[:ARG] for every trial
    overrides: list[str]  # fixed for every trial, "a.b=VALUE"
    space: dict[str, str]  # field -> distribution as written
    distributions: dict[str, str]  # field -> Optuna's distribution (JSON), choices typed as their field
    trials: int  # the budget: trials started, whatever their end
    metric: str  # config.best_metric as a run evaluates it
    direction: str  # "maximize" or "minimize" (config.best_mode)
    sampler: str = "tpe"
    seed: int = 0
    startup_trials: int | None = None  # TPE/CMA-ES: random trials first (None: Optuna's default)
    pruner: str = "median"
    min_resource: int | None = None  # asha/hyperband: steps before the first rung (None: Optuna's default)
    reduction_factor: int = 3  # asha/hyperband: keep the best 1/reduction_factor at each rung
    warmup_steps: int = 0  # median: no pruning before this step
    storage: str = ""  # "": BASE/journal.log; a path: that journal file; else a URL Optuna accepts
    study_name: str = "search"
    lease_seconds: float = 120.0  # a running trial whose worker stops renewing its lease this long is taken over
    python: str = ""  # the interpreter that runs trials

    # Fields a rerun may change without starting a different search.
    MUTABLE = ("trials", "lease_seconds", "python")

    def optuna_distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        return {f: optuna.distributions.json_to_distribution(d) for f, d in self.distributions.items()}


def read_spec(base: str) -> Spec | None:
    path = os.path.join(base, SPEC_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return Spec(**json.load(f))


def not_a_search(base: str) -> str:
    return (f"{base} holds no {SPEC_FILE}: not a search folder (start one with `python -m launch.search run` "
            "or `submit`)")


def write_spec(base: str, spec: Spec) -> None:
    path = os.path.join(base, SPEC_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(dataclasses.asdict(spec), f, indent=2)
    os.replace(path + ".tmp", path)


def differences(old: Spec, new: Spec) -> list[str]:
    """The fields (other than Spec.MUTABLE) in which two searches differ."""
    a, b = dataclasses.asdict(old), dataclasses.asdict(new)
    return [k for k in a if k not in Spec.MUTABLE and a[k] != b[k]]


def trial_overrides(params: dict) -> list[str]:
    """A trial's sampled values as config overrides, `FIELD=VALUE`."""
    return [f"{field}={value}" for field, value in params.items()]


def grid_points(space: dict[str, optuna.distributions.BaseDistribution]) -> dict[str, list]:
    """Every axis's values for the grid sampler: choices and int ranges (ValueError naming a continuous axis)."""
    points = {}
    for field, d in space.items():
        if isinstance(d, optuna.distributions.CategoricalDistribution):
            points[field] = list(d.choices)
        elif isinstance(d, optuna.distributions.IntDistribution) and not d.log:
            points[field] = list(range(d.low, d.high + 1))
        else:
            raise ValueError(field)
    return points


def trial_dir(base: str, number: int) -> str:
    """BASE/trial_NNNN: trial `number`'s jaxclf.train workdir."""
    return os.path.join(os.path.abspath(base), f"trial_{number:04d}")


@contextlib.contextmanager
def claims_lock(base: str) -> Iterator[None]:
    """Held while a worker decides which trial it runs next, so two never take the same one.

    Optuna's own O_EXCL lock file (what its journal uses on NFS): a holder that died is broken
    after 30 s of no change."""
    lock = journal.JournalFileOpenLock(os.path.join(base, "claims"))
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def storage(spec: Spec, base: str) -> optuna.storages.BaseStorage | str:
    """The journal file (default BASE/journal.log; safe for many processes on a shared filesystem) or a URL."""
    if spec.storage and "://" in spec.storage:
        return spec.storage
    path = spec.storage or os.path.join(os.path.abspath(base), "journal.log")
    return journal.JournalStorage(journal.JournalFileBackend(path))


def trial_seed(seed: int, number: int) -> int:
    """The sampler's seed for trial `number`: (seed, number) mixed by NumPy's SeedSequence, so trials get
    unrelated random streams (consecutive integer seeds give MT19937 streams whose first draws are close)."""
    return int(np.random.SeedSequence((seed, number)).generate_state(1)[0])


def make_sampler(spec: Spec, seed: int) -> optuna.samplers.BaseSampler:
    """The spec's sampler, seeded with `seed`."""
    startup = {} if spec.startup_trials is None else {"n_startup_trials": spec.startup_trials}
    if spec.sampler == "tpe":
        # multivariate: model the axes jointly; constant_liar: parallel workers avoid the points running trials hold.
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, **startup)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "grid":
        # Trial i takes point i of the grid's order, shuffled by the seed: the same seed in every process.
        return _GridSampler(grid_points(spec.optuna_distributions()), seed=spec.seed)
    if spec.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, **startup)
    raise ValueError(f"unknown sampler {spec.sampler!r}; one of {', '.join(SAMPLERS)}")


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, less its after_trial: that calls study.stop() once the grid is covered, which
    Optuna allows only inside study.optimize; here the budget (at most the grid's size) ends the search."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def make_pruner(spec: Spec) -> optuna.pruners.BasePruner:
    """The spec's pruner; the resource is the training step, the value each evaluation's metric."""
    min_resource = "auto" if spec.min_resource is None else spec.min_resource
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_warmup_steps=spec.warmup_steps)
    if spec.pruner == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource,
                                                      reduction_factor=spec.reduction_factor)
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1 if min_resource == "auto" else min_resource,
                                              reduction_factor=spec.reduction_factor)
    if spec.pruner == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"unknown pruner {spec.pruner!r}; one of {', '.join(PRUNERS)}")


def load_study(spec: Spec, base: str, seed: int | None = None) -> optuna.Study:
    """The study of `spec` (created if it does not exist yet), its sampler seeded with `seed` (default spec.seed)."""
    return optuna.create_study(
        storage=storage(spec, base), study_name=spec.study_name, direction=spec.direction,
        sampler=make_sampler(spec, spec.seed if seed is None else seed), pruner=make_pruner(spec), load_if_exists=True,
    )
