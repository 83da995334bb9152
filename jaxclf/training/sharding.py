"""The device mesh and how arrays are laid out on it: parameters replicated, batches split on `data`."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process) with one `data` axis."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, scalars)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """The leading (batch) dimension is split over the `data` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, field: str) -> None:
    """Fail early, naming the config field, when a global batch cannot be split evenly."""
    devices, processes = mesh.size, jax.process_count()
    if batch_size % devices or batch_size % processes:
        raise ValueError(
            f"config.{field}={batch_size} must be divisible by the {devices} devices "
            f"({processes} processes) of the mesh; use a multiple of {devices}"
        )


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble this process's part of a batch into global arrays split on `data` (asynchronous copy)."""
    sharding = batch_sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def fsdp_spec(shape: tuple[int, ...], num_shards: int, min_size: int = 2**14) -> PartitionSpec:
    """Split the largest dimension divisible by `num_shards` over `data`; small or indivisible arrays stay whole."""
    if int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % num_shards == 0:
            spec = [None] * len(shape)
            spec[dim] = DATA_AXIS
            return PartitionSpec(*spec)
    return PartitionSpec()


def state_sharding(state, mesh: Mesh, mode: str):
    """Shardings for every leaf of `state`: all replicated ("replicate", data parallel), or parameters,
    EMA and optimizer state split over the `data` axis by `fsdp_spec` ("fsdp", for models whose
    state does not fit one device many times over)."""
    if mode == "replicate":
        return jax.tree.map(lambda _: replicated(mesh), state)
    if mode == "fsdp":
        return jax.tree.map(lambda leaf: NamedSharding(mesh, fsdp_spec(leaf.shape, mesh.size)), state)
    raise ValueError(f"config.param_sharding={mode!r}: use 'replicate' or 'fsdp'")
