"""Weights & Biases as a tracker (`config.trackers=("wandb",)`, `pip install 'jaxclf[wandb]'`).

A resumed run continues its W&B run (`wandb.init(id=..., resume="allow")`). Offline
(`config.tracking.wandb.mode="offline"` or WANDB_MODE=offline) the run files stay under
`<dir>/wandb/offline-run-*` for `wandb sync`; a resumed offline run adds one such folder per part.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import ml_collections

# Artefact types by the folder their files come from; the rest are "files".
ARTIFACT_TYPES = {"plots": "plots", "eval": "evaluation"}


def make(options: ml_collections.ConfigDict, run_name: str, workdir: str) -> WandbTracker:
    return WandbTracker(options, run_name, options.dir or workdir)


class WandbTracker:
    """A jaxclf run as a W&B run in `options.project` (and `options.entity`)."""

    def __init__(self, options: ml_collections.ConfigDict, run_name: str, directory: str):
        self._options, self._run_name, self._dir = options, run_name, directory
        self._run = None

    def open(self, run_id: str | None) -> str:
        import wandb  # imported here, in the tracker's thread: training never waits for it

        os.makedirs(self._dir, exist_ok=True)
        self._run = wandb.init(
            project=self._options.project, entity=self._options.entity or None, name=self._run_name,
            tags=list(self._options.tags) or None, dir=self._dir, mode=self._options.mode or None,
            id=run_id, resume="allow" if run_id else None, reinit="create_new",
            settings=wandb.Settings(console="off", save_code=False),  # the console stays the run's own
        )
        return self._run.id

    def log_params(self, params: dict[str, object]) -> None:
        self._run.config.update(params, allow_val_change=True)

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self._run.log(scalars, step=step)

    def log_summary(self, step: int, summary: dict[str, float | str]) -> None:
        self._run.summary.update(summary)

    def log_files(self, paths: Sequence[str], folder: str) -> None:
        """One artefact per folder, `<run id>-<folder>` (a new version each time it is logged)."""
        import wandb

        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{self._run.id}-{folder or 'files'}")
        artifact = wandb.Artifact(name, type=ARTIFACT_TYPES.get(folder.split("/")[0], "files"))
        for path in paths:
            artifact.add_file(path, name=os.path.basename(path))
        self._run.log_artifact(artifact)

    def close(self, status: str) -> None:
        self._run.finish(exit_code=0 if status == "finished" else 1)
