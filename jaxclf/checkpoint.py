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

    def restore_state(self, step: int, target_state):
        """Only the train state at `step` (for evaluation, prediction, export), shaped like `target_state`."""
        self._check_structure(step, target_state)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        return self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state

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
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 -- any read failure means: try the previous checkpoint
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
        saved_shapes = _shapes_by_path(saved)
        target_shapes = _shapes_by_path(target_state)
        problems = [f"missing in checkpoint: {k} {target_shapes[k]}" for k in target_shapes if k not in saved_shapes]
        problems += [f"not in this model: {k} {saved_shapes[k]}" for k in saved_shapes if k not in target_shapes]
        problems += [
            f"shape of {k}: checkpoint {saved_shapes[k]}, model {target_shapes[k]}"
            for k in target_shapes
            if k in saved_shapes and saved_shapes[k] != target_shapes[k]
        ]
        if problems:
            shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
            raise CheckpointError(
                f"checkpoint {self._path(step)} does not fit this model/optimizer (was it written by another "
                f"config.model_name or config.optim?):\n  {shown}\nUse a new --workdir for a different model."
            )

    def _path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def close(self) -> None:
        """Wait for pending writes, then release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()


def _shapes_by_path(tree) -> dict[str, tuple[int, ...]]:
    """{'params/layer1/0/conv1/kernel': (3, 3, 64, 64), ...} for every array-like leaf of `tree`."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {_path_name(path): tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, "shape")}


def _path_name(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(p for p in parts if p != "value")
