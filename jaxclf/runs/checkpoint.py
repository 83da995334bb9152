"""Checkpoints of a run: train state, data-iterator position and run facts, saved together by orbax.

Saves are asynchronous (the copy off the device happens before `save` returns, the write in a
background thread) and atomic: orbax writes to a temporary folder and renames it when complete,
so a kill during a write leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxclf.models import tree_paths
from jaxclf.config import ConfigError


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: from another model, or no readable checkpoint at all."""


@dataclasses.dataclass(frozen=True)
class IteratorState:
    """A data iterator's position recorded at some batch; saved by grain's orbax handler."""

    state: bytes

    def get_state(self) -> bytes:
        return self.state


class Checkpointer:
    """Keeps the last `keep` checkpoints under `workdir/checkpoints`, and the best one by `best_metric`.

    Each holds three items: `state` (the TrainState pytree), `data` (grain iterator position, one
    file per process) and `meta` (JSON facts the run needs before it can build its data loader).
    """

    def __init__(self, workdir: str, keep: int, best_metric: str = "val/accuracy", best_mode: str = "max"):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self._best_metric = best_metric
        sign = 1.0 if best_mode == "max" else -1.0
        keep_best = ocp.checkpoint_managers.BestN(
            # BestN sorts ascending and keeps the last: the highest score, the earliest step of equals
            # (the step EarlyStopping reports).
            get_metric_fn=lambda metrics: (sign * metrics[best_metric], -metrics["step"]),
            n=1,
            keep_checkpoints_without_metrics=False,
        )
        options = ocp.CheckpointManagerOptions(
            create=True,
            enable_async_checkpointing=True,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(
                [ocp.checkpoint_managers.LatestN(keep), keep_best]
            ),
        )
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, data_state: IteratorState, meta: dict, metrics: dict | None = None) -> None:
        """Start saving at `step` (returns once the state is off the device, before the write ends).

        `metrics` (the evaluation at this step, if any) rank the checkpoint for keeping the best.
        """
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_state),
            meta=ocp.args.JsonSave(meta),
        )
        if metrics is not None and self._best_metric not in metrics:
            metrics = None  # an evaluation that does not rank checkpoints (another evaluator's, config.evals)
        metrics = None if metrics is None else {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self._manager.save(step, args=args, metrics=metrics, force=True)

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def best_step(self) -> int | None:
        """The step of the best evaluation so far (recorded in the latest checkpoint's meta), else the latest."""
        latest = self.latest_step()
        if latest is None:
            return None
        meta = self.restore_meta(latest)
        return (meta.get("early_stopping") or {}).get("best_step") or latest

    def restore_meta(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore_state(self, step: int, fields: dict) -> dict:
        """Some fields of the train state at `step`, for evaluation, prediction and export.

        `fields` maps TrainState field names ("params", "model_state", "ema_params") to abstract
        trees whose jax.ShapeDtypeStructs give shape, dtype and sharding. The optimizer state is
        not read, and the devices may differ from those that trained.
        """
        self._check_structure(step, fields)
        restore_args = ocp.checkpoint_utils.construct_restore_args(fields)
        args = ocp.args.PyTreeRestore(fields, restore_args=restore_args, partial_restore=True)
        return ocp.PyTreeCheckpointer().restore(os.path.join(self._path(step), "state"), args=args)

    def restore_latest(self, target_state, make_iterator: Callable[[dict], object]):
        """Restore the newest readable checkpoint: (step, state, data iterator, meta), or None if none.

        `target_state` gives structure, dtypes and shardings; `make_iterator(meta)` builds the data
        iterator to move to the saved position. A checkpoint that cannot be read (truncated,
        partial) is skipped with a warning naming it and the one used instead; one whose arrays
        do not fit `target_state` (another model) is an error listing the mismatches.
        """
        steps = sorted(self._manager.all_steps(), reverse=True)
        failures = []
        for step in steps:
            try:
                self._check_structure(step, target_state)
                meta = self.restore_meta(step)
                iterator = make_iterator(meta)
                abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(iterator)
                    ),
                )
            except (CheckpointError, ConfigError):
                raise
            except Exception as e:  # noqa: BLE001 -- any read failure means: try the previous checkpoint
                if _data_mismatch(e):
                    raise CheckpointError(
                        f"{self._path(step)} was written by a run that read its data differently: "
                        f"{_data_mismatch(e)}. Resume with the same config.batch_size, seed, data and sampling "
                        "as that run, or train in a new --workdir."
                    ) from None
                failures.append(f"{self._path(step)}: {type(e).__name__}: {e}".splitlines()[0])
                print(f"warning: cannot read checkpoint {self._path(step)} ({failures[-1]})", file=sys.stderr)
                continue
            if failures:
                print(f"warning: resuming from the older checkpoint {self._path(step)} instead", file=sys.stderr)
                self._set_aside([s for s in steps if s > step])
            return step, restored.state, iterator, meta
        if failures:
            raise CheckpointError(
                "no checkpoint in " + self.directory + " can be read:\n  " + "\n  ".join(failures)
                + "\nMove that folder away to start afresh."
            )
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Rename unreadable checkpoints to `unreadable-<step>-<time>` (kept for inspection, out of the way)."""
        if jax.process_index() == 0:
            for step in steps:
                aside = os.path.join(self.directory, f"unreadable-{step}-{int(time.time())}")
                os.rename(self._path(step), aside)
                print(f"warning: moved {self._path(step)} to {aside}", file=sys.stderr)
        multihost_utils.sync_global_devices("jaxclf: unreadable checkpoints set aside")
        self._manager.reload()

    def _check_structure(self, step: int, target_state) -> None:
        """Raise CheckpointError listing every array whose path or shape differs from `target_state`."""
        saved = self._manager.item_metadata(step)["state"]
        if saved is None:
            raise OSError(f"no state metadata in {self._path(step)}")
        saved_shapes = tree_paths.shapes(saved)
        if isinstance(target_state, dict):  # some fields only (restore_state)
            saved_shapes = {k: v for k, v in saved_shapes.items() if k.split("/", 1)[0] in target_state}
        problems = tree_paths.mismatches(saved_shapes, tree_paths.shapes(target_state), "checkpoint", "this model")
        if problems:
            raise CheckpointError(
                f"checkpoint {self._path(step)} does not fit this model/optimizer (was it written by another "
                f"config.model_name or config.optim?):\n{tree_paths.format_problems(problems, 20)}\n"
                "Use a new --workdir for a different model."
            )

    def _path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def close(self) -> None:
        """Wait for pending writes, then release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()



def _data_mismatch(error: BaseException) -> str | None:
    """grain's complaint that the saved iterator belongs to another sampler or source, if that is
    what `error` (or an error it wraps) is: a configuration change, not an unreadable checkpoint."""
    while error is not None:
        if isinstance(error, ValueError) and "in checkpoint does not match" in str(error):
            return str(error).splitlines()[0].rstrip(".")
        error = error.__cause__ or error.__context__
    return None
