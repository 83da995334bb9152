"""XLA:CPU compiler options for jaxclf's jitted steps: which kernel library runs which op.

jax 0.10's XLA:CPU hands convolutions, matmuls and elementwise ops to YNNPACK by default. On the
2-core machines of bench/README.md, ResNet-18's train step ran 1.8x faster with YNNPACK doing only
reductions (BatchNorm statistics), XNNPACK the matmuls and XLA's own Eigen kernels the
convolutions; ViTs ran the same or slightly faster (those runs are in bench/README.md). Only
XLA:CPU reads these options; GPU programs get none.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

CPU_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE",
    "xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_DOT",
}


def compiler_options(platform: str) -> dict[str, str] | None:
    """`CPU_OPTIONS` for programs on `platform` "cpu", else None (pass as `jax.jit(..., compiler_options=)`).

    None as well when XLA_FLAGS already sets either option (the user's choice wins) or when this
    jaxlib does not know them (they are experimental flags and may be renamed).
    """
    if platform != "cpu":
        return None
    if any(name in os.environ.get("XLA_FLAGS", "") for name in CPU_OPTIONS) or not _options_accepted():
        return None
    return dict(CPU_OPTIONS)


@functools.cache
def _options_accepted() -> bool:
    """Whether XLA:CPU compiles a trivial program with `CPU_OPTIONS` (unknown options fail to compile)."""
    try:
        probe = jax.device_put(np.zeros(2, np.float32), jax.devices("cpu")[0])
        jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS).lower(probe).compile()
    except Exception:  # noqa: BLE001 - any compile failure means: do not pass the options
        return False
    return True
