"""A search worker: takes the study's trials one at a time and runs each in a process of its own.

    python -m launch.worker BASE [--wait]   (`launch.search run --parallel K` starts K; each SLURM array task runs one)

Which trial next, decided under BASE's claims lock so that two workers never take the same one:
1. a running trial whose lease has gone stale (its worker was killed) or was released (it was
   preempted): resumed from its own checkpoint, under its own number, so it is neither lost nor
   counted twice;
2. else, while the study has fewer than `trials` trials, a new one that Optuna samples;
3. else, with `wait`, sleep while other workers' trials run (one may yet go stale); without, stop.
The lease is BASE/trial_NNNN/lease, renewed every lease_seconds/4 while the trial runs. Optuna's
journal storage has no heartbeats of its own; this lease works for any storage.

A trial ends as its exit status says (`jaxclf.train.main`): 0 -> COMPLETE with the run's best
value of config.best_metric; 4 -> PRUNED; 75 (a stop signal; it checkpointed) -> still running,
its lease released for whoever resumes it; anything else -> FAIL. A worker that receives SIGTERM,
SIGINT or SIGUSR1 passes it to its trial, waits for the checkpoint and exits 75, so SLURM requeues it.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from launch import runs, slurm, study as study_lib

WAIT = "wait"


class Lease:
    """A worker's claim on one trial: a file naming the worker, whose modification time it keeps fresh."""

    def __init__(self, workdir: str, owner: str):
        self.path, self.owner = os.path.join(workdir, "lease"), owner

    @staticmethod
    def held(workdir: str, seconds: float) -> bool:
        """Whether someone renewed the lease of the trial in `workdir` within `seconds`."""
        try:
            return time.time() - os.stat(os.path.join(workdir, "lease")).st_mtime < seconds
        except FileNotFoundError:
            return False

    def take(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path + ".tmp", "w") as f:
            f.write(self.owner)
        os.replace(self.path + ".tmp", self.path)

    def ours(self) -> bool:
        try:
            with open(self.path) as f:
                return f.read() == self.owner
        except FileNotFoundError:
            return False

    def renew(self) -> bool:
        """Refresh the lease; False if another worker has taken the trial over."""
        if not self.ours():
            return False
        os.utime(self.path)
        return True

    def release(self) -> None:
        if self.ours():
            os.remove(self.path)


@dataclass(frozen=True)
class Claim:
    number: int
    trial_id: int
    params: dict
    resumed: bool


class Worker:
    """Runs trials of the search in BASE until the budget is spent (see the module docstring)."""

    def __init__(self, base: str, spec: study_lib.Spec, wait: bool):
        self.base, self.spec, self.wait = os.path.abspath(base), spec, wait
        self.name = f"{socket.gethostname().split('.')[0]}:{os.getpid()}"
        self.study = study_lib.load_study(self.spec, self.base)
        self._signal: int | None = None
        self._child: subprocess.Popen | None = None

    def run(self) -> int:
        """Work until no trial is left (0) or a stop signal arrives (75, after the trial checkpointed)."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        while self._signal is None:
            with study_lib.claims_lock(self.base):
                claim = self._claim()
            if claim == WAIT:
                time.sleep(self.spec.lease_seconds / 4)
            elif claim is None:
                self._say(f"no trial left to run ({self.spec.trials} in the study)")
                return 0
            else:
                self._run(claim)
        self._say(f"stopped by {signal.Signals(self._signal).name}; run again to continue")
        return slurm.EXIT_PREEMPTED

    def _claim(self) -> Claim | str | None:
        trials = self.study.get_trials(deepcopy=False)
        for trial in trials:
            workdir = study_lib.trial_dir(self.base, trial.number)
            if trial.state == TrialState.RUNNING and not Lease.held(workdir, self.spec.lease_seconds):
                Lease(workdir, self.name).take()
                return Claim(trial.number, trial._trial_id, trial.params, resumed=True)
        if len(trials) < self.spec.trials:
            # A seed per trial: workers asking in turn never repeat each other's random draws, and
            # a study's draws do not depend on which worker asked.
            self.study.sampler = study_lib.make_sampler(self.spec, study_lib.trial_seed(self.spec.seed, len(trials)))
            trial = self.study.ask(self.spec.optuna_distributions())
            Lease(study_lib.trial_dir(self.base, trial.number), self.name).take()
            return Claim(trial.number, trial._trial_id, trial.params, resumed=False)
        return WAIT if self.wait and any(t.state == TrialState.RUNNING for t in trials) else None

    def _run(self, claim: Claim) -> None:
        """Run the claimed trial's process, keep its lease fresh, and tell the study how it ended."""
        workdir = study_lib.trial_dir(self.base, claim.number)
        lease = Lease(workdir, self.name)
        settings = " ".join(study_lib.trial_overrides(claim.params))
        result = runs.read_result(workdir)
        if claim.resumed and result and result["status"] in runs.FINISHED:  # its worker died before telling
            self._say(f"trial {claim.number}: finished before its worker stopped; recording it")
            self._tell(claim, 0 if result["status"] != "pruned" else slurm.EXIT_PRUNED)
            lease.release()
            return
        verb = "resumed from its checkpoint (its worker stopped)" if claim.resumed else "started"
        self._say(f"trial {claim.number}: {verb}  {settings}  ->  {workdir}")
        with open(os.path.join(workdir, "train.log"), "a") as log:
            self._child = subprocess.Popen(
                [self.spec.python, "-m", "launch.trial", self.base, str(claim.number)], stdout=log,
                stderr=subprocess.STDOUT, cwd=slurm.REPO, preexec_fn=_stop_with_parent,
            )
        if self._signal is not None:  # arrived while the trial was being claimed
            self._child.send_signal(self._signal)
        lost = threading.Event()
        done = threading.Event()
        keeper = threading.Thread(target=self._keep_lease, args=(lease, done, lost), daemon=True)
        keeper.start()
        code = self._child.wait()
        done.set()
        keeper.join()
        self._child = None
        if lost.is_set():
            self._say(f"trial {claim.number}: another worker took it over (this worker stalled); left to it")
        elif code == slurm.EXIT_PREEMPTED:
            self._say(f"trial {claim.number}: stopped by a signal after a checkpoint; released for resuming")
            lease.release()
        else:
            self._tell(claim, code)
            lease.release()

    def _keep_lease(self, lease: Lease, done: threading.Event, lost: threading.Event) -> None:
        while not done.wait(self.spec.lease_seconds / 4):
            try:
                renewed = lease.renew()
            except OSError:  # a passing filesystem error: the next renewal tries again
                continue
            if not renewed:
                lost.set()
                self._child.terminate()
                return

    def _tell(self, claim: Claim, code: int) -> None:
        workdir = study_lib.trial_dir(self.base, claim.number)
        result = runs.read_result(workdir) or {}
        described = runs.describe(workdir, self.spec.metric, "max" if self.spec.direction == "maximize" else "min")
        trial = optuna.Trial(self.study, claim.trial_id)
        trial.set_user_attr("exit_status", code)
        trial.set_user_attr("steps", result.get("step", described["last step"] or 0))
        trial.set_user_attr("workdir", workdir)
        if code == 0 and result.get("status") in ("done", "early_stopped"):
            value = (result.get("best") or {}).get("best_value")
            if value is None:
                value = result["val_metrics"][self.spec.metric]
            self.study.tell(claim.number, value)
            self._say(f"trial {claim.number}: {result['status']} at step {result['step']}, "
                      f"best {self.spec.metric} {value:.4g}")
        elif code == slurm.EXIT_PRUNED:
            self.study.tell(claim.number, state=TrialState.PRUNED)
            self._say(f"trial {claim.number}: pruned at step {result.get('step')}")
        else:
            self.study.tell(claim.number, state=TrialState.FAIL)
            self._say(f"trial {claim.number}: failed with exit status {code}: {_last_line(workdir)}")

    def _on_signal(self, signum, frame) -> None:
        self._signal = self._signal or signum
        if self._child is not None and self._child.poll() is None:
            self._child.send_signal(signum)

    def _say(self, message: str) -> None:
        print(f"[{self.name}] {message}", flush=True)


def _last_line(workdir: str) -> str:
    """The last line of the trial's log (its error, usually)."""
    try:
        with open(os.path.join(workdir, "train.log"), errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        return "no train.log"
    return lines[-1] if lines else "train.log is empty"


_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _stop_with_parent() -> None:
    """In the trial's process before it starts: SIGTERM it if the worker dies (it checkpoints and exits),
    so a killed worker never leaves a trial running that another worker would then resume too."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.worker", description=__doc__.splitlines()[0])
    parser.add_argument("base", help="the search's folder (BASE/search.json)")
    parser.add_argument("--wait", action="store_true", help="at the end, wait while other workers' trials run")
    args = parser.parse_args(argv)
    spec = study_lib.read_spec(args.base)
    if spec is None:
        print(f"error: {study_lib.not_a_search(args.base)}", file=sys.stderr)
        return 2
    return Worker(args.base, spec, args.wait).run()


if __name__ == "__main__":
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sys.exit(main())
