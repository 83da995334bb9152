"""Experiment trackers (config.trackers): what W&B and MLflow get, read back with each library's own
reader and no network (MLflow's client on a local SQLite store, W&B's offline run files), resuming the
same tracked run, and a failing or stuck tracker never stopping or blocking training."""

import json
import os
import shutil
import threading
import warnings

import jax
import ml_collections
import pytest

from jaxclf import config as config_lib, evaluate, train
from jaxclf.runs import checkpoint, inference
from jaxclf.tracking import trackers
from jaxclf.tracking.metrics import read_metrics

import wandb_records  # tests/ is on sys.path

# ---- the seam, with a tracker defined here (no library, no training) -------------------------------------


class RecordingTracker:
    """Records every call; `fail` names methods that raise (a network that is down), `block` one that waits."""

    def __init__(self, fail=(), block=None):
        self.calls, self.fail, self.block = [], set(fail), block
        self.release = threading.Event()
        self.opened_with = []

    def open(self, run_id):
        self.opened_with.append(run_id)
        if "open" in self.fail:
            raise ConnectionError("tracker unreachable")
        return run_id or "run-1"

    def __getattr__(self, method):
        if method not in ("log_params", "log_scalars", "log_summary", "log_files", "close"):
            raise AttributeError(method)

        def call(*args):
            self.calls.append((method, *args))
            if method == self.block:
                self.release.wait(timeout=60)
            if method in self.fail:
                raise ConnectionError("tracker unreachable")

        return call

    def scalars(self):
        return [(step, scalars) for method, step, scalars in (c for c in self.calls if c[0] == "log_scalars")]


TRACKER = {}


def make(options, run_name, workdir):  # the module interface of jaxclf.tracking.trackers.TRACKERS
    return TRACKER["current"]


@pytest.fixture
def recording(monkeypatch):
    monkeypatch.setitem(trackers.TRACKERS, "recording", (__name__, "json", "recording"))

    def start(tracker, workdir, **tracking):
        TRACKER["current"] = tracker
        config = config_lib.base_config()
        config.trackers = ("recording",)
        config.tracking.update(tracking)
        with config.tracking.unlocked():
            config.tracking.recording = ml_collections.ConfigDict()
        return trackers.start(config, str(workdir), params={"optim": {"lr": 0.1}})

    return start


def test_a_resumed_run_continues_the_tracked_run_without_repeating_steps(recording, tmp_path):
    first = RecordingTracker()
    run = recording(first, tmp_path)
    for step in (2, 4, 6):
        run.write(step, {"train/loss": 1.0 / step})
    run.close(interrupted=True)
    assert first.opened_with == [None] and first.calls[0] == ("log_params", {"optim.lr": 0.1})
    assert first.calls[-1] == ("close", trackers.KILLED)

    # Resumed from the checkpoint at step 4: steps 6 (and 4's evaluation, a new metric) come again.
    second = RecordingTracker()
    run = recording(second, tmp_path)
    run.write(6, {"train/loss": 99.0})
    run.write(4, {"val/accuracy": 0.5})
    run.write(8, {"train/loss": 0.125, "val/accuracy": 0.75})
    run.log_summary(8, {"result": {"status": "done", "step": 8}})
    run.close()
    assert second.opened_with == ["run-1"]  # the same tracked run, and its params are not logged again
    assert [c[0] for c in second.calls] == ["log_scalars", "log_scalars", "log_summary", "close"]
    assert second.scalars() == [(4, {"val/accuracy": 0.5}), (8, {"train/loss": 0.125, "val/accuracy": 0.75})]
    assert second.calls[2] == ("log_summary", 8, {"result/status": "done", "result/step": 8})
    assert second.calls[-1] == ("close", trackers.FINISHED)


def test_a_failing_tracker_warns_once_and_keeps_trying(recording, tmp_path):
    tracker = RecordingTracker(fail={"log_scalars"})
    with pytest.warns(trackers.TrackerWarning) as caught:
        run = recording(tracker, tmp_path)
        for step in range(1, 6):
            run.write(step, {"train/loss": float(step)})
        run.close()
    assert len(caught) == 1 and "log_scalars failed (ConnectionError" in str(caught[0].message)
    assert len(tracker.scalars()) == 5  # each call still tried: the network may come back
    assert tracker.calls[-1] == ("close", trackers.KILLED)


def test_a_tracker_that_cannot_start_warns_once_and_takes_nothing(recording, tmp_path):
    tracker = RecordingTracker(fail={"open"})
    with pytest.warns(trackers.TrackerWarning, match="could not start") as caught:
        run = recording(tracker, tmp_path, queue_size=2)
        for step in range(1, 20):
            run.write(step, {"train/loss": float(step)})
        run.close()
    assert len(caught) == 1 and tracker.calls == []


def test_a_stuck_tracker_never_blocks_the_writer(recording, tmp_path):
    """The writer returns while the tracker's first call hangs: the calls beyond the queue are dropped."""
    tracker = RecordingTracker(block="log_scalars")
    with pytest.warns(trackers.TrackerWarning) as caught:
        run = recording(tracker, tmp_path, queue_size=3, finish_timeout_s=0.0)
        for step in range(1, 51):
            run.write(step, {"train/loss": float(step)})
        assert not tracker.release.is_set()  # all 50 writes returned while the tracker still hangs
        run.close()
    tracker.release.set()
    messages = [str(w.message) for w in caught]
    assert any("calls are dropped" in m for m in messages) and any("still sending" in m for m in messages)
    assert run._workers[0].dropped >= 50 - 1 - 3


def test_only_process_0_tracks(recording, tmp_path, monkeypatch):
    monkeypatch.setattr(trackers.jax, "process_index", lambda: 1)
    tracker = RecordingTracker()
    run = recording(tracker, tmp_path)
    run.write(1, {"train/loss": 1.0})
    run.close()
    assert tracker.opened_with == [] and tracker.calls == [] and not os.path.exists(tmp_path / trackers.STATE_FILE)


def test_unknown_or_missing_trackers_name_the_field_and_the_extra(monkeypatch):
    config = config_lib.base_config()
    config.trackers = ("neptune",)
    with pytest.raises(config_lib.ConfigError, match="config.trackers names 'neptune'; known trackers: wandb, mlflow"):
        trackers.check(config)
    config.trackers = ("mlflow",)
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(config_lib.ConfigError, match=r"pip install 'jaxclf\[mlflow\]'"):
        trackers.check(config)


def test_trackers_parse_from_the_command_line():
    overrides = config_lib.parse_override_args(["--config.trackers=wandb,mlflow"])
    config = config_lib.load_config("configs/quickstart.py", overrides)
    assert config.trackers == ("wandb", "mlflow")


# ---- W&B and MLflow themselves, on a tiny run that is killed and resumed, then evaluated -------------------

TOTAL_STEPS = 8


def _without_network(env: pytest.MonkeyPatch, base) -> None:
    """Neither library phones home (MLflow's usage telemetry, W&B's error reports), and W&B's own folders
    stay out of the home directory."""
    env.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    env.setenv("WANDB_ERROR_REPORTING", "false")
    env.setenv("WANDB_SILENT", "true")
    for kind in ("CACHE", "DATA", "CONFIG"):
        env.setenv(f"WANDB_{kind}_DIR", str(base / f"wandb_{kind.lower()}"))


@pytest.fixture(scope="module")
def tracked_run(digits_root, tmp_path_factory):
    """A tiny run with both trackers: to step 6, "killed" before its step-6 checkpoint (removed), resumed
    from step 4 (so steps 5-6 are trained and logged again), then evaluated."""
    base = tmp_path_factory.mktemp("tracked")
    config = config_lib.load_config(f"tests/tiny_config.py:{digits_root}")
    config.total_steps = TOTAL_STEPS
    config.log_every_steps = 2
    config.checkpoint_every_steps = 4
    config.trackers = ("wandb", "mlflow")
    config.tracking.wandb.mode = "offline"
    # MLflow's local file store: what the issue names, and it opens in milliseconds where a new SQLite store
    # runs seconds of migrations (SQLite, MLflow's default, is what the slow test below uses).
    config.tracking.mlflow.tracking_uri = f"file://{base}/mlruns"
    workdir = str(base / "run")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store only on request
        _without_network(env, base)
        train.train_and_evaluate(config, workdir, stop_at_step=6, devices=jax.devices()[:1])
        shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
        assert checkpoint.Checkpointer(workdir, keep=2).latest_step() == 4
        train.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
        report, _, _ = evaluate.evaluate(inference.load_trained(workdir), "val")
    return workdir, config, report


def _logged_once(workdir):
    """{metric: {step: value}} of metrics.jsonl, a repeated step keeping its first value (which the resumed
    run reproduces, but for throughput)."""
    by_key = {}
    for record in read_metrics(workdir):
        for key, value in record.items():
            if key != "step":
                by_key.setdefault(key, {}).setdefault(record["step"], value)
    return by_key


def test_metrics_jsonl_repeats_the_steps_the_resume_repeated(tracked_run):
    workdir, _, _ = tracked_run
    steps = [r["step"] for r in read_metrics(workdir) if "train/loss" in r]
    assert steps == [2, 4, 6, 6, 8]  # what the trackers must not repeat


def test_mlflow_run_read_back_with_its_client(tracked_run, monkeypatch):
    from mlflow import MlflowClient

    workdir, config, report = tracked_run
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(config.tracking.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name("jaxclf")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # the resumed run and evaluate continued it
    run = runs[0]
    assert run.info.run_id == json.load(open(os.path.join(workdir, trackers.STATE_FILE)))["mlflow"]["run_id"]
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    params = run.data.params
    assert params["optim.lr"] == "0.1" and params["model_name"] == "tiny_cnn" and params["total_steps"] == "8"
    for key, by_step in _logged_once(workdir).items():
        history = client.get_metric_history(run.info.run_id, key)
        assert [(m.step, m.value) for m in history] == sorted(by_step.items()), key
    assert run.data.tags["result/status"] == "done"
    result = json.load(open(os.path.join(workdir, "result.json")))
    assert run.data.metrics["result/val_metrics/val/accuracy"] == pytest.approx(result["val_metrics"]["val/accuracy"])
    assert run.data.metrics["eval/val/accuracy"] == pytest.approx(report["accuracy"])
    listed = lambda folder: sorted(f.path for f in client.list_artifacts(run.info.run_id, folder))
    assert {"classes.json", "config.json", "result.json"} <= set(listed(None))
    assert listed("plots") == ["plots/accuracy.png", "plots/loss.png", "plots/lr.png"]
    assert {f"eval/val/{name}" for name in ("report.json", "report.md", "confusion_matrix.png", "reliability.png",
                                            "predictions.csv")} == set(listed("eval/val"))


def test_wandb_offline_run_files_read_back(tracked_run):
    workdir, _, report = tracked_run
    files = wandb_records.run_files(os.path.join(workdir, "wandb"))
    assert len(files) == 3  # the first part, the resumed part, evaluate: one offline folder each
    records = [record for path in files for record in wandb_records.read_records(path)]
    kind = lambda name: [getattr(r, name) for r in records if r.WhichOneof("record_type") == name]
    run_id = json.load(open(os.path.join(workdir, trackers.STATE_FILE)))["wandb"]["run_id"]
    assert {run.run_id for run in kind("run")} == {run_id} and kind("run")[0].display_name == "run"
    config = {item.key: json.loads(item.value_json) for record in kind("config") for item in record.update}
    assert config["optim.lr"] == 0.1 and config["model_name"] == "tiny_cnn"
    history = {}
    for row in kind("history"):
        values = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in row.item}
        for key, value in values.items():
            history.setdefault(key, []).append((values["_step"], value))
    for key, by_step in _logged_once(workdir).items():
        assert history[key] == sorted(by_step.items()), key  # each step once, in order
    summary = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
               for record in kind("summary") for item in record.update}
    assert summary["result/status"] == "done" and summary["result/step"] == TOTAL_STEPS
    assert summary["eval/val/accuracy"] == pytest.approx(report["accuracy"])
    artifacts = {a.type: {c.path for c in a.manifest.contents} for a in kind("artifact")}
    assert artifacts["plots"] == {"accuracy.png", "loss.png", "lr.png"}
    assert {"report.json", "report.md", "confusion_matrix.png"} <= artifacts["evaluation"]
    assert {"result.json", "config.json"} <= artifacts["files"]
    assert [e.exit_code for e in kind("exit")] == [1, 0, 0]  # stopped (to resume), done, evaluated


@pytest.mark.slow
def test_a_failing_mlflow_warns_once_and_the_run_ends_with_the_same_metrics(digits_root, tmp_path, monkeypatch):
    """MLflow's client raising on every metric (the network down mid-run): one warning, the same metrics."""
    from mlflow import MlflowClient

    config = config_lib.load_config(f"tests/tiny_config.py:{digits_root}")
    config.total_steps, config.log_every_steps = 6, 2
    train.train_and_evaluate(config, str(tmp_path / "plain"), devices=jax.devices()[:1])

    def network_down(self, run_id, metrics=(), **kwargs):
        if metrics:
            raise ConnectionError("Max retries exceeded with url: /api/2.0/mlflow/runs/log-batch")
        return original(self, run_id, metrics=metrics, **kwargs)

    original = MlflowClient.log_batch
    monkeypatch.setattr(MlflowClient, "log_batch", network_down)
    _without_network(monkeypatch, tmp_path)
    config.trackers = ("mlflow",)
    config.tracking.mlflow.tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    config.tracking.mlflow.artifact_location = str(tmp_path / "mlartifacts")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train.train_and_evaluate(config, str(tmp_path / "tracked"), devices=jax.devices()[:1])
    tracker_warnings = [w for w in caught if issubclass(w.category, trackers.TrackerWarning)]
    assert len(tracker_warnings) == 1 and "ConnectionError" in str(tracker_warnings[0].message)
    strip = lambda records: [{k: v for k, v in r.items() if k != "train/images_per_sec"} for r in records]
    assert strip(read_metrics(str(tmp_path / "tracked"))) == strip(read_metrics(str(tmp_path / "plain")))
    run = MlflowClient(config.tracking.mlflow.tracking_uri).search_runs(
        [MlflowClient(config.tracking.mlflow.tracking_uri).get_experiment_by_name("jaxclf").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.params["total_steps"] == "6"
