"""Checkpoints of a run: the train state and the data iterator's position, saved together by orbax.

Saves are asynchronous (the copy off the device happens before `save` returns, the write in a
background thread) and atomic: orbax writes to a temporary folder and renames it when complete.
"""

from __future__ import annotations

import dataclasses
import os

import grain
import jax
import orbax.checkpoint as ocp


@dataclasses.dataclass(frozen=True)
class IteratorState:
    """A data iterator's position recorded at some batch; saved by grain's orbax handler."""

    state: bytes

    def get_state(self) -> bytes:
        return self.state


class Checkpointer:
    """Keeps the last `keep` checkpoints under `workdir/checkpoints`."""

    def __init__(self, workdir: str, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, data_state: IteratorState) -> None:
        """Start saving `state` and the iterator position at `step` (returns before the write ends)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_state)
        )
        self._manager.save(step, args=args)

    def restore(self, step: int, target_state, data_iterator):
        """Restore the state into the structure/shardings of `target_state`; move `data_iterator` to its saved position."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(data_iterator)
        )
        restored = self._manager.restore(step, args=args)
        return restored.state

    def close(self) -> None:
        """Wait for pending writes, then release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()
