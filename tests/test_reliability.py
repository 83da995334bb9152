"""Preemption, kills, corrupt checkpoints, NaNs and user mistakes: nothing is lost, everything is named.

The kill tests run `python -m jaxclf.train` as a real process with tests/tiny_config.py and
compare its final checkpoint with an uninterrupted run, bit for bit (CPU is deterministic).
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxclf import config as config_lib, data, train
from jaxclf.runs import checkpoint
from jaxclf.training import optim, preemption
from jaxclf.tracking.metrics import read_metrics
from limits import SUBPROCESS_S  # tests/ is on sys.path

TOTAL_STEPS = 24


def _command(digits_root, workdir, *overrides):
    return [
        sys.executable, "-m", "jaxclf.train", "--config", f"tests/tiny_config.py:{digits_root}",
        "--workdir", str(workdir), f"--config.total_steps={TOTAL_STEPS}", "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=3", *overrides,
    ]


def _final_state(workdir, step=TOTAL_STEPS):
    ckpt = checkpoint.Checkpointer(str(workdir), keep=2)
    assert ckpt.latest_step() == step
    return ocp.StandardCheckpointer().restore(os.path.join(ckpt.directory, str(step), "state"))


def _assert_same_state(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)


def _last_logged_step(workdir) -> int:
    try:
        return max(r["step"] for r in read_metrics(str(workdir)) if "train/loss" in r)
    except (FileNotFoundError, ValueError):
        return 0


def _assert_ends_clean(stderr: str) -> None:
    """No shared memory of grain's data workers left at exit (Python's resource_tracker would warn of it)."""
    assert "resource_tracker" not in stderr and "leaked" not in stderr, stderr


def _run_until(command, workdir, step, sig, whole_group=False):
    """Start a training process, send `sig` once it has logged `step`, and return its exit code.

    `whole_group` signals the process group, data workers included, as SLURM and Ctrl-C do.
    """
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=whole_group
    )
    deadline = time.time() + SUBPROCESS_S
    while _last_logged_step(workdir) < step and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    if whole_group:
        os.killpg(process.pid, sig)
    else:
        process.send_signal(sig)
    _, stderr = process.communicate(timeout=SUBPROCESS_S)
    return process.returncode, stderr


@pytest.fixture(scope="module")
def uninterrupted_workdir(digits_root, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(_command(digits_root, workdir), check=True, capture_output=True, timeout=SUBPROCESS_S)
    return workdir


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_workdir):
    return _final_state(uninterrupted_workdir)


@pytest.mark.slow  # make test-all; the default run keeps a shorter check of the same guarantee
def test_kills_at_random_steps_resume_to_identical_parameters(digits_root, tmp_path, uninterrupted, uninterrupted_workdir):
    rng = random.Random(0)
    workdir = tmp_path / "run"
    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL, signal.SIGTERM):
        target = min(_last_logged_step(workdir) + rng.randint(1, 6), TOTAL_STEPS - 1)
        code, stderr = _run_until(_command(digits_root, workdir), workdir, target, sig)
        if sig == signal.SIGTERM and code != 0:  # 0: it finished before the signal landed
            assert code == preemption.EXIT_PREEMPTED, stderr
            assert "stopped by SIGTERM" in stderr
    subprocess.run(_command(digits_root, workdir), check=True, capture_output=True, timeout=SUBPROCESS_S)
    _assert_same_state(_final_state(workdir), uninterrupted)
    val = lambda d: [r for r in read_metrics(str(d)) if "val/accuracy" in r][-1]
    assert val(workdir) == val(uninterrupted_workdir)


@pytest.mark.slow  # make test-all; the default run keeps a shorter check of the same guarantee
def test_sigterm_to_the_process_group_with_data_workers_still_checkpoints(digits_root, tmp_path):
    workdir = tmp_path / "run"
    command = _command(digits_root, workdir, "--config.data.num_workers=1", f"--config.total_steps={10 * TOTAL_STEPS}")
    code, stderr = _run_until(command, workdir, 5, signal.SIGTERM, whole_group=True)
    assert code == preemption.EXIT_PREEMPTED, stderr
    _assert_ends_clean(stderr)
    stopped_at = int(stderr.split("at step ")[1].split()[0])
    assert checkpoint.Checkpointer(str(workdir), keep=2).latest_step() == stopped_at
    result = subprocess.run(command, capture_output=True, text=True, timeout=SUBPROCESS_S)
    assert result.returncode == 0, result.stderr
    assert f"at step {stopped_at}" in result.stderr  # "Resumed from ... at step N"


def test_sigterm_checkpoints_the_current_step(digits_root, tmp_path):
    """With two data workers: the preempted run also stops them and leaves no shared memory behind."""
    workdir = tmp_path / "run"
    command = _command(digits_root, workdir, "--config.data.num_workers=2", f"--config.total_steps={10 * TOTAL_STEPS}")
    code, stderr = _run_until(command, workdir, 4, signal.SIGTERM)
    assert code == preemption.EXIT_PREEMPTED, stderr
    _assert_ends_clean(stderr)
    stopped_at = int(stderr.split("at step ")[1].split()[0])
    # The signal's step was saved even though checkpoint_every_steps=3 would not have saved it.
    assert checkpoint.Checkpointer(str(workdir), keep=2).latest_step() == stopped_at


@pytest.mark.slow  # the default run checks a preempted run's stderr (test_sigterm_checkpoints_the_current_step)
def test_an_early_stopped_run_with_data_workers_ends_clean(digits_root, tmp_path):
    """Early stopping leaves the loop with batches prefetched and evaluation workers running; both are
    stopped and their shared memory unlinked before exit (a finished or pruned run leaves the same way)."""
    workdir = tmp_path / "run"
    result = subprocess.run(_command(digits_root, workdir, "--config.data.num_workers=2", "--config.optim.lr=-0.5",
                                     "--config.eval_every_epochs=0.05", "--config.early_stopping_patience=1"),
                            capture_output=True, text=True, timeout=SUBPROCESS_S)
    assert result.returncode == 0 and "Early stopping at step" in result.stderr, result.stderr
    _assert_ends_clean(result.stderr)


def test_corrupt_latest_checkpoint_falls_back_to_previous(digits_root, tmp_path, uninterrupted):
    workdir = tmp_path / "run"
    config = config_lib.load_config(f"tests/tiny_config.py:{digits_root}", [
        f"total_steps={TOTAL_STEPS}", "checkpoint_every_steps=3", "keep_checkpoints=3"])
    train.train_and_evaluate(config, str(workdir), stop_at_step=9)
    # Truncate every array file of the newest checkpoint (step 9), as a full disk or a bad copy would.
    for dirpath, _, files in os.walk(workdir / "checkpoints" / "9" / "state"):
        for name in files:
            with open(os.path.join(dirpath, name), "r+b") as f:
                f.truncate(3)
    # A write killed half-way leaves a temporary folder; it must be ignored.
    shutil.copytree(workdir / "checkpoints" / "6", workdir / "checkpoints" / "12.orbax-checkpoint-tmp-1")
    shutil.rmtree(workdir / "checkpoints" / "12.orbax-checkpoint-tmp-1" / "state")
    result = subprocess.run(_command(digits_root, workdir), capture_output=True, text=True, timeout=SUBPROCESS_S)
    assert result.returncode == 0, result.stderr
    assert "cannot read checkpoint" in result.stderr and "/checkpoints/9" in result.stderr
    assert "resuming from the older checkpoint" in result.stderr and "/checkpoints/6" in result.stderr
    _assert_same_state(_final_state(workdir), uninterrupted)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(digits_root, tmp_path):
    workdir = tmp_path / "run"
    result = subprocess.run(
        _command(digits_root, workdir, "--config.optim.lr=1e30", "--config.optim.name=sgd"),
        capture_output=True, text=True, timeout=SUBPROCESS_S,
    )
    assert result.returncode == 3, result.stderr
    assert "the training loss became nan at step" in result.stderr
    assert "config.optim.lr" in result.stderr and "Traceback" not in result.stderr
    bad_step = int(result.stderr.split("at step ")[1].split(";")[0])
    saved = checkpoint.Checkpointer(str(workdir), keep=2).latest_step()
    assert saved is None or saved < bad_step
    if saved:
        state = ocp.StandardCheckpointer().restore(str(workdir / "checkpoints" / str(saved) / "state"))
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state))


def test_skip_mode_counts_nonfinite_steps_and_keeps_parameters_finite(digits_root, tmp_path):
    config = config_lib.load_config(f"tests/tiny_config.py:{digits_root}", [
        "optim.lr=1e30", "nonfinite_loss=skip", "total_steps=6", "log_every_steps=6"])
    train.train_and_evaluate(config, str(tmp_path / "run"))
    record = [r for r in read_metrics(str(tmp_path / "run")) if "train/loss" in r][-1]
    assert 1 <= record["train/skipped_steps"] <= 6
    state = _final_state(tmp_path / "run", step=6)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state["params"]))
    # Skipped steps leave the optimizer state as it was, so its schedule count lags the step by
    # their number, and the logged lr is the one the latest update used.
    updates = 6 - record["train/skipped_steps"]
    counts = {int(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]
              if "count" in jax.tree_util.keystr(path)}
    assert counts == {updates}
    steps_per_epoch = len(data.load_splits(config.data)["train"]) // config.batch_size
    schedule = optim.make_schedule(config.optim, 6, steps_per_epoch)
    assert record["train/lr"] == pytest.approx(float(schedule(max(updates - 1, 0))))
    # The count survives a resume (it travels in the checkpoint).
    train.train_and_evaluate(config, str(tmp_path / "resumed"), stop_at_step=3)
    train.train_and_evaluate(config, str(tmp_path / "resumed"))
    resumed = [r for r in read_metrics(str(tmp_path / "resumed")) if "train/loss" in r][-1]
    assert resumed["step"] == 6 and resumed["train/skipped_steps"] == record["train/skipped_steps"]


def test_checkpoint_of_another_model_lists_mismatched_keys(digits_root, tmp_path):
    config = config_lib.load_config(f"tests/tiny_config.py:{digits_root}", ["total_steps=3"])
    train.train_and_evaluate(config, str(tmp_path / "run"))
    wider = config_lib.load_config(f"tests/tiny_config.py:{digits_root}", ["total_steps=6", "model.width=24"])
    with pytest.raises(checkpoint.CheckpointError) as error:
        train.train_and_evaluate(wider, str(tmp_path / "run"))
    message = str(error.value)
    assert "does not fit this model" in message
    assert "shape of params/conv/kernel: checkpoint (3, 3, 3, 16), this model (3, 3, 3, 24)" in message


def test_resuming_with_other_data_settings_names_them_and_keeps_the_checkpoint(digits_root, tmp_path):
    config = config_lib.load_config(f"tests/tiny_config.py:{digits_root}", ["total_steps=3"])
    train.train_and_evaluate(config, str(tmp_path / "run"))
    checkpoints = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    smaller_batch = config_lib.load_config(f"tests/tiny_config.py:{digits_root}", ["total_steps=6", "batch_size=16"])
    with pytest.raises(checkpoint.CheckpointError, match="read its data differently: Sampler in checkpoint"):
        train.train_and_evaluate(smaller_batch, str(tmp_path / "run"))
    more_workers = config_lib.load_config(f"tests/tiny_config.py:{digits_root}", ["total_steps=6", "data.num_workers=1"])
    with pytest.raises(config_lib.ConfigError, match="config.data.num_workers=1 but the checkpoint was written with 0"):
        train.train_and_evaluate(more_workers, str(tmp_path / "run"))
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == checkpoints  # nothing set aside


def test_unwritable_workdir_fails_before_training(digits_root, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    config = config_lib.load_config(f"tests/tiny_config.py:{digits_root}")
    with pytest.raises(config_lib.ConfigError, match="is not writable"):
        train.train_and_evaluate(config, str(blocker / "run"))


def test_missing_data_root_names_the_path(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "jaxclf.train", "--config", f"tests/tiny_config.py:{tmp_path}/nope",
         "--workdir", str(tmp_path / "w")],
        capture_output=True, text=True, timeout=SUBPROCESS_S,
    )
    assert result.returncode == 2
    assert f"{tmp_path}/nope" in result.stderr and "Traceback" not in result.stderr
