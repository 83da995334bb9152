"""MLflow as a tracker (`config.trackers=("mlflow",)`, `pip install 'jaxclf[mlflow]'`; mlflow-skinny suffices).

Uses `MlflowClient` with explicit run ids (no global active run), so it is safe in a background thread
and beside a user's own MLflow runs. A resumed run continues its MLflow run (`update_run` to RUNNING).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import ml_collections

# MLflow's limits (mlflow.utils.validation): params per log_batch call and characters per param value.
PARAMS_PER_BATCH = 100
MAX_PARAM_CHARS = 6000
STATUS = {"finished": "FINISHED", "killed": "KILLED", "failed": "FAILED"}


def make(options: ml_collections.ConfigDict, run_name: str, workdir: str) -> MlflowTracker:
    return MlflowTracker(options.tracking_uri or None, options.experiment, options.artifact_location or None, run_name,
                         os.path.abspath(workdir))


class MlflowTracker:
    """A jaxclf run as an MLflow run of `experiment` (created when missing, its files at `artifact_location`)
    at `tracking_uri`."""

    def __init__(self, tracking_uri: str | None, experiment: str, artifact_location: str | None, run_name: str,
                 workdir: str):
        self._uri, self._experiment, self._artifact_location = tracking_uri, experiment, artifact_location
        self._run_name, self._workdir = run_name, workdir
        self._client = self._run_id = None

    def open(self, run_id: str | None) -> str:
        from mlflow import MlflowClient  # imported here, in the tracker's thread: training never waits for it

        self._client = MlflowClient(self._uri)
        if run_id:
            self._client.update_run(run_id, status="RUNNING")
        else:
            experiment = self._client.get_experiment_by_name(self._experiment)
            experiment_id = experiment.experiment_id if experiment else self._client.create_experiment(
                self._experiment, artifact_location=self._artifact_location)
            run_id = self._client.create_run(experiment_id, run_name=self._run_name,
                                             tags={"jaxclf.workdir": self._workdir}).info.run_id
        self._run_id = run_id
        return run_id

    def log_params(self, params: dict[str, object]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)[:MAX_PARAM_CHARS]) for key, value in params.items()]
        for start in range(0, len(items), PARAMS_PER_BATCH):
            self._client.log_batch(self._run_id, params=items[start:start + PARAMS_PER_BATCH])

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self._run_id, metrics=[Metric(key, value, now, step) for key, value in scalars.items()])

    def log_summary(self, step: int, summary: dict[str, float | str]) -> None:
        """Numbers as metrics at `step`, text as tags (MLflow has no summary of its own)."""
        from mlflow.entities import RunTag

        numbers = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.log_scalars(step, numbers)
        tags = [RunTag(k, str(v)) for k, v in summary.items() if k not in numbers and v is not None]
        if tags:
            self._client.log_batch(self._run_id, tags=tags)

    def log_files(self, paths: Sequence[str], folder: str) -> None:
        for path in paths:
            self._client.log_artifact(self._run_id, path, artifact_path=folder or None)

    def close(self, status: str) -> None:
        self._client.set_terminated(self._run_id, status=STATUS[status])
