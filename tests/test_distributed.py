"""Multi-process training for real: two local processes (2 CPU devices each, collectives over
localhost with gloo) train together and match one process with 4 devices."""

import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxclf.data import sources
from jaxclf.data.sampler import GlobalBatchSampler
from jaxclf.tracking.metrics import read_metrics
from limits import SUBPROCESS_S  # tests/ is on sys.path

STEPS = 12


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(digits_root, workdir, *extra):
    return [
        sys.executable, "-m", "jaxclf.train", "--config", f"tests/tiny_config.py:{digits_root}",
        "--workdir", str(workdir), f"--config.total_steps={STEPS}", "--config.log_every_steps=2", *extra,
    ]


def _final_state(workdir):
    """The final train state as numpy arrays (the checkpoint's device layout is not this process's)."""
    path = str(workdir / "checkpoints" / str(STEPS) / "state")
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def _train_single_and_two_processes(tmp_path, *args) -> None:
    """Train with `args` in one process of 4 devices (workdir "single") and two of 2 ("multi")."""
    single = subprocess.run(_command(*args[:1], tmp_path / "single", *args[1:]), env=_env(4),
                            capture_output=True, text=True, timeout=SUBPROCESS_S)
    assert single.returncode == 0, single.stderr
    port = _free_port()
    processes = [
        subprocess.Popen(
            _command(*args[:1], tmp_path / "multi", *args[1:], "--coordinator_address", f"127.0.0.1:{port}",
                     "--num_processes", "2", "--process_id", str(i)),
            env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=SUBPROCESS_S) for p in processes]
    for p, (_, err) in zip(processes, outputs):
        assert p.returncode == 0, err


@pytest.mark.parametrize("num_workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_two_processes_match_one_process(digits_root, tmp_path, num_workers):
    _train_single_and_two_processes(tmp_path, digits_root, f"--config.data.num_workers={num_workers}")

    # Each process read its own data shard: both iterator positions are in the checkpoint.
    data_files = sorted(f for f in os.listdir(tmp_path / "multi" / "checkpoints" / str(STEPS) / "data") if f.startswith("process"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
    # Only process 0 wrote metrics (one line per log step, not two).
    multi_log = [r for r in read_metrics(str(tmp_path / "multi")) if "train/loss" in r]
    single_log = [r for r in read_metrics(str(tmp_path / "single")) if "train/loss" in r]
    assert [r["step"] for r in multi_log] == [r["step"] for r in single_log]
    np.testing.assert_allclose(
        [r["train/loss"] for r in multi_log], [r["train/loss"] for r in single_log], rtol=1e-5
    )
    for a, b in zip(jax.tree.leaves(_final_state(tmp_path / "multi")), jax.tree.leaves(_final_state(tmp_path / "single"))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # make test-all; the default run keeps a shorter check of the same guarantee
def test_skipped_images_are_counted_over_both_processes(digits_root, tmp_path):
    # Break the first records of batch rows that process 0 reads (row 0) and process 1 reads (row 16
    # of the 32): the logged count must be the global one, as one process counts it.
    root = tmp_path / "digits"
    shutil.copytree(digits_root, root)
    paths = sources.load_image_folder_splits(str(root))["train"].paths
    sampler = GlobalBatchSampler(len(paths), 32, 1, seed=0)
    broken = {sampler.record_at(0), sampler.record_at(16)}
    for index in broken:
        with open(paths[index], "wb") as f:
            f.write(b"\x89PNG truncated")
    draws = sum(sampler.record_at(position) in broken for position in range(STEPS * 32))
    _train_single_and_two_processes(tmp_path, root, "--config.data.bad_images=skip")
    for run in ("single", "multi"):
        logged = [r for r in read_metrics(str(tmp_path / run)) if "data/skipped_images" in r]
        assert logged[-1]["data/skipped_images"] == draws >= 2, run
