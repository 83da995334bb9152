"""The training loop end to end on the digits image folder: accuracy, resume, evaluation, errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxclf import config as config_lib, train
from jaxclf.runs import checkpoint
from jaxclf.tracking.metrics import read_metrics
from limits import SUBPROCESS_S  # tests/ is on sys.path


def _config(digits_root, **overrides):
    config = config_lib.load_config(f"tests/tiny_config.py:{digits_root}")
    config.update(overrides)
    config_lib.validate(config)
    return config


def test_quickstart_model_learns_digits(digits_root, tmp_path):
    """ResNet-18, the quickstart recipe shortened: a real run reaches a stated accuracy."""
    config = config_lib.load_config("configs/quickstart.py")
    config.data.root = digits_root
    config.data.prepare = ""
    config.data.pp_train = "decode|inception_crop(16, scale=(0.6, 1.0), ratio=(0.8, 1.25))"
    config.data.pp_eval = "decode"
    config.data.num_workers = 1
    config.num_epochs = 6.0
    # One device: 8 simulated devices on 2 cores only add overhead (test_steps covers 8 vs 1).
    val = train.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    assert val["val/accuracy"] >= 0.9, val
    records = read_metrics(str(tmp_path / "run"))
    train_records = [r for r in records if "train/loss" in r]
    assert train_records[-1]["train/loss"] < train_records[0]["train/loss"]
    for key in ("train/lr", "train/images_per_sec", "train/accuracy"):
        assert key in train_records[-1]
    assert {"val/loss", "val/accuracy", "val/top5"} <= set(records[-1])
    with open(tmp_path / "run" / "config.json") as f:
        saved = json.load(f)
    assert saved["model_name"] == "resnet18" and saved["dtype"] == "float32"  # "auto" on a CPU
    assert json.load(open(tmp_path / "run" / "classes.json"))["class_names"] == [str(d) for d in range(10)]


def test_resume_equals_uninterrupted_run(digits_root, tmp_path):
    config = _config(digits_root, total_steps=12)
    train.train_and_evaluate(config, str(tmp_path / "straight"))
    train.train_and_evaluate(config, str(tmp_path / "resumed"), stop_at_step=6)
    assert checkpoint.Checkpointer(str(tmp_path / "resumed"), keep=2).latest_step() == 6
    train.train_and_evaluate(config, str(tmp_path / "resumed"))

    def final_params(workdir):
        ckpt = checkpoint.Checkpointer(workdir, keep=2)
        assert ckpt.latest_step() == 12
        path = os.path.join(ckpt.directory, "12", "state")
        import orbax.checkpoint as ocp

        return ocp.StandardCheckpointer().restore(path)

    straight, resumed = final_params(str(tmp_path / "straight")), final_params(str(tmp_path / "resumed"))
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    # Steps 9-12 form the same logging window in both runs.
    last_loss = lambda d: [r["train/loss"] for r in read_metrics(d) if "train/loss" in r][-1]
    assert last_loss(str(tmp_path / "straight")) == last_loss(str(tmp_path / "resumed"))


# With workers in make test-all (test_data_pipeline checks the eval loader's worker passes by default).
@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_evaluation_counts_every_example_once(digits_root, tmp_path, num_workers):
    # 360 val images; 8 devices and batch 48 do not divide it: the last batch is padded and masked.
    # With 2 workers each batches every other image: every batch must still be full for the mesh.
    config = _config(digits_root, total_steps=2, eval_batch_size=48)
    config.data.num_workers = num_workers
    val = train.train_and_evaluate(config, str(tmp_path / "run"))
    num_val = sum(len(files) for _, _, files in os.walk(os.path.join(digits_root, "val")))
    assert val["val/examples"] == num_val
    assert num_val % 48 != 0


def test_a_failing_evaluation_keeps_the_training_done(digits_root, tmp_path, monkeypatch):
    config = _config(digits_root, total_steps=6)  # evaluates (and checkpoints) at the end only

    def broken_pass(self):
        raise OSError("val images unreachable")
        yield

    monkeypatch.setattr(train.pipeline.EvalLoader, "one_pass", broken_pass)
    with pytest.raises(OSError, match="unreachable"):
        train.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    assert checkpoint.Checkpointer(str(tmp_path / "run"), keep=2).latest_step() == 6
    monkeypatch.undo()
    val = train.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    assert val["val/examples"] == 360  # resumed at step 6 and evaluated


def test_with_ema_the_best_checkpoint_is_chosen_by_the_ema_metrics(digits_root, tmp_path):
    config = _config(digits_root, total_steps=12, ema_decay=0.5, eval_every_epochs=0.1)
    train.train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    with open(tmp_path / "run" / "config.json") as f:
        assert json.load(f)["best_metric"] == "val_ema/accuracy"
    evals = [r for r in read_metrics(str(tmp_path / "run")) if "val_ema/accuracy" in r]
    with open(tmp_path / "run" / "result.json") as f:
        best = json.load(f)["best"]
    assert len(evals) >= 2 and best["best_value"] == max(r["val_ema/accuracy"] for r in evals)


def test_num_classes_mismatch_is_named(digits_root, tmp_path):
    with pytest.raises(config_lib.ConfigError, match=r"config\.num_classes=7 .* has 10 classes"):
        train.train_and_evaluate(_config(digits_root, num_classes=7), str(tmp_path / "run"))


def test_batch_not_divisible_by_devices_is_named(digits_root, tmp_path):
    with pytest.raises(ValueError, match=r"config\.batch_size=30 must be divisible by the 8 devices"):
        train.train_and_evaluate(_config(digits_root, batch_size=30), str(tmp_path / "run"))


@pytest.mark.parametrize("config_file", [pytest.param("configs/resnet50.py", marks=pytest.mark.slow), "configs/vit_b.py"])
def test_finetune_configs_without_data_name_the_field(config_file, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty_hf_cache"))

    def run(*overrides):
        return subprocess.run(
            [sys.executable, "-m", "jaxclf.train", "--config", config_file, "--workdir", str(tmp_path / "w"),
             *overrides], capture_output=True, text=True, timeout=SUBPROCESS_S, env=env,
        )

    result = run()  # the config's hub weights are not in this (empty, offline) cache
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "config.model_init='timm/" in result.stderr and "not in the Hugging Face cache" in result.stderr
    result = run("--config.model_init=")  # from scratch: the data set is what is missing
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "config.data.root is not set" in result.stderr


def test_command_line_overrides_reach_the_run(digits_root, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "jaxclf.train", "--config", "configs/quickstart.py", "--workdir", str(tmp_path / "w"),
         f"--config.data.root={digits_root}", "--config.optim.lrr=0.1"],
        capture_output=True, text=True, timeout=SUBPROCESS_S,
    )
    assert result.returncode == 2
    assert "Did you mean config.optim.lr?" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow  # make test-all; FSDP steps: test_steps.py, exact resume: test_resume_equals_uninterrupted_run
def test_fsdp_run_resumes_to_the_same_parameters(digits_root, tmp_path):
    # width 2048 makes the conv kernel and the head large enough to be split over the 8 devices.
    config = _config(digits_root, total_steps=6, param_sharding="fsdp", model={"width": 2048})
    train.train_and_evaluate(config, str(tmp_path / "straight"))
    train.train_and_evaluate(config, str(tmp_path / "resumed"), stop_at_step=3)
    train.train_and_evaluate(config, str(tmp_path / "resumed"))
    import orbax.checkpoint as ocp

    restore = lambda d: ocp.StandardCheckpointer().restore(str(tmp_path / d / "checkpoints" / "6" / "state"))
    for a, b in zip(jax.tree.leaves(restore("straight")), jax.tree.leaves(restore("resumed"))):
        np.testing.assert_array_equal(a, b)
