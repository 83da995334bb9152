"""What a train step needs on each device, known before launching (`python -m jaxclf.train --dry_run`).

The step is compiled for abstract inputs (shapes, dtypes and shardings: no data, no weights) and XLA's
analysis of the compiled program is read: argument, output and temporary bytes per device
(`memory_analysis`) and FLOPs (`cost_analysis`). The train state's parts are summed from their shapes
and shardings, so FSDP's split shows per device. The largest batch that fits a memory budget comes
from a linear fit of two compiles (batch b and 2b), checked by compiling at the predicted batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh

from jaxclf.training import sharding

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Bytes per device of one compiled train step at `batch_size` (global), and its FLOPs per device."""

    batch_size: int
    params: int
    optimizer: int
    model_state: int  # BatchNorm statistics, RNG counters
    ema: int
    batch: int
    temporaries: int  # activations kept for the backward pass and every other scratch buffer
    arguments: int
    outputs: int
    aliased: int  # outputs written over the donated state
    flops: float

    @property
    def total(self) -> int:
        """The step's peak on a device by XLA's buffer assignment: inputs, outputs not written over the
        donated inputs, temporaries (not counted: the runtime's own reserve, e.g. cuDNN workspaces)."""
        return self.arguments + self.outputs - self.aliased + self.temporaries


def per_device_bytes(tree, shardings) -> int:
    """Bytes one device holds of the arrays (or ShapeDtypeStructs) of `tree`, laid out by `shardings` (a tree
    of `jax.sharding.Sharding` of the same structure); for a sharded leaf, the largest shard's."""
    leaves, layouts = jax.tree.leaves(tree), jax.tree.leaves(shardings)
    if len(leaves) != len(layouts):
        raise ValueError(f"{len(leaves)} arrays but {len(layouts)} shardings")
    return sum(math.prod(layout.shard_shape(leaf.shape)) * leaf.dtype.itemsize for leaf, layout in zip(leaves, layouts))


def abstract_batch(batch_size: int, image_shape: tuple[int, int, int], mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """What the train loader yields, as shapes split on the mesh's `data` axis: uint8 images, int32 labels."""
    layout = sharding.batch_sharded(mesh)
    return {"image": jax.ShapeDtypeStruct((batch_size, *image_shape), np.uint8, sharding=layout),
            "label": jax.ShapeDtypeStruct((batch_size,), np.int32, sharding=layout)}


def measure(train_step, state, state_sharding, batch: dict[str, jax.ShapeDtypeStruct]) -> StepMemory:
    """Compile `train_step` (a jitted `step(state, batch)`, see `steps.make_train_step`) for the abstract
    `state` laid out by `state_sharding` and `batch`, and read what XLA says it needs per device."""
    compiled = train_step.lower(state, batch).compile()
    analysis = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost  # one entry per device program in older jax
    return StepMemory(
        batch_size=batch["label"].shape[0],
        params=per_device_bytes(state.params, state_sharding.params),
        optimizer=per_device_bytes(state.opt_state, state_sharding.opt_state),
        model_state=per_device_bytes(state.model_state, state_sharding.model_state),
        ema=per_device_bytes(state.ema_params, state_sharding.ema_params),
        batch=per_device_bytes(batch, {k: v.sharding for k, v in batch.items()}),
        temporaries=analysis.temp_size_in_bytes,
        arguments=analysis.argument_size_in_bytes,
        outputs=analysis.output_size_in_bytes,
        aliased=analysis.alias_size_in_bytes,
        flops=float((cost or {}).get("flops", float("nan"))),
    )


@dataclasses.dataclass(frozen=True)
class BatchFit:
    """The largest global batch (a multiple of `multiple`) whose step fits `budget` bytes per device (0:
    none does), from the fit total(b) = fixed + per_example * b, and the compile that checked it."""

    budget: int
    multiple: int
    fixed: float
    per_example: float
    batch_size: int
    checked: StepMemory | None


def largest_batch(measure_at: Callable[[int], StepMemory], first: StepMemory, budget: int, multiple: int) -> BatchFit:
    """Fit total bytes linearly in the batch through `first` and `measure_at(2 * first.batch_size)`, predict
    the largest multiple of `multiple` within `budget`, and compile there (`measure_at`) to check; where the
    check is over budget (XLA picks other algorithms at other sizes), step down by the excess, at most twice."""
    second = measure_at(2 * first.batch_size)
    per_example = (second.total - first.total) / first.batch_size
    if per_example <= 0:
        raise ValueError(f"the step's memory did not grow with the batch ({first.total} bytes at batch "
                         f"{first.batch_size}, {second.total} at {second.batch_size}); cannot fit a batch size")
    fixed = first.total - per_example * first.batch_size
    batch_size = _round_down((budget - fixed) / per_example, multiple)
    checked = None
    for _ in range(3):
        if batch_size < multiple:
            return BatchFit(budget, multiple, fixed, per_example, 0, checked)
        checked = measure_at(batch_size)
        if checked.total <= budget:
            break
        batch_size = _round_down(batch_size - (checked.total - budget) / per_example, multiple)
    return BatchFit(budget, multiple, fixed, per_example, batch_size, checked)


def _round_down(batch_size: float, multiple: int) -> int:
    return max(0, int(batch_size // multiple) * multiple)


def report(step: StepMemory, devices: int, fit: BatchFit | None = None) -> str:
    """The table `--dry_run` prints: bytes per device by part, FLOPs, and the batch that fits."""
    rows = [("parameters", step.params), ("optimizer state", step.optimizer), ("model state", step.model_state),
            ("EMA parameters", step.ema), ("batch", step.batch),
            ("temporaries (activations)", step.temporaries), ("outputs not donated", step.outputs - step.aliased),
            ("total (peak by XLA)", step.total)]
    lines = [f"train step at batch {step.batch_size} over {devices} device(s), per device:"]
    lines += [f"  {name:<27} {_size(value):>12}" for name, value in rows]
    lines.append(f"  {'FLOPs per step':<27} {step.flops:>12.4g}")
    if fit is not None:
        lines.append(f"memory budget {_size(fit.budget)} per device: fixed {_size(fit.fixed)} + "
                     f"{_size(fit.per_example)} per example of the global batch (fit of batch {step.batch_size} "
                     f"and {2 * step.batch_size})")
        if fit.batch_size:
            lines.append(f"  largest batch that fits: {fit.batch_size} (compiled: {_size(fit.checked.total)})")
        else:
            lines.append(f"  no batch fits: even batch {fit.multiple} needs more")
    return "\n".join(lines)


def _size(n: float) -> str:
    return f"{n / GIB:.3f} GiB" if abs(n) >= GIB / 10 else f"{n / 2**20:.2f} MiB"
