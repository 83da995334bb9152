"""Joining a multi-process (multi-host) run through JAX's own runtime.

Every process runs the same command; `initialize` connects them before any device is used. After
it, `jax.devices()` lists the devices of every process and one mesh spans them all.
"""

from __future__ import annotations

import os

import jax


def initialize(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> bool:
    """Connect this process to the others; return whether the run is multi-process.

    Explicit flags win; otherwise a SLURM job step with several tasks is detected (JAX reads the
    coordinator from SLURM's variables). A plain single process does nothing.
    """
    explicit = coordinator_address is not None
    if explicit and (num_processes is None or process_id is None):
        raise ValueError("--coordinator_address needs --num_processes and --process_id")
    if not explicit and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return False
    # CPU processes exchange collectives over TCP with gloo; GPUs use NCCL whatever this says.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()
    return True
