"""XLA:CPU compiler options for jaxclf's jitted programs: which kernel library runs which op.

jax 0.10's XLA:CPU hands convolutions, matmuls and elementwise ops to YNNPACK by default; every
program on CPU gets `CPU_OPTIONS` instead (ResNet-18's train step 1.8x faster). A model adds its
own options for its train step with the "cpu" kernel set (`Classifier.xla_cpu_train_options`).
The runs behind each choice are in bench/README.md. GPU programs get no options.
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
# ViT train steps: XLA's concurrency-optimised scheduler made the ViT-S step ~12% slower on two cores.
VIT_TRAIN_OPTIONS = {"xla_cpu_enable_concurrency_optimized_scheduler": False}
# Bottleneck ResNets' train steps, whose 1x1 convs are matmuls with the "cpu" kernels: ~13% faster
# with YNNPACK running those matmuls (ResNet-18 and ViT-S were not faster with it).
BOTTLENECK_TRAIN_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_DOT"}
# Train steps of models with a remat policy (config.model.remat): XLA:CPU's OptimizationBarrierExpander
# ("cse_barrier_expander") drops the barriers jax.checkpoint puts before each recomputation, and a later
# CSE pass then folds the recomputed forward into the saved one, which undoes the remat (ViT-B/16 at
# batch 64: 16.7 GB of temporaries with and without it; 2.2 GB with the pass off). GPU keeps the barriers.
REMAT_TRAIN_OPTIONS = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def compiler_options(platform: str, model_options: dict | None = None) -> dict | None:
    """`CPU_OPTIONS` updated with `model_options` for programs on `platform` "cpu", else None (pass as
    `jax.jit(..., compiler_options=)`).

    None as well when XLA_FLAGS already names an option (the user's choice wins) or when this
    jaxlib does not know them (they are experimental flags and may be renamed).
    """
    if platform != "cpu":
        return None
    options = {**CPU_OPTIONS, **(model_options or {})}
    if any(name in os.environ.get("XLA_FLAGS", "") for name in options) or not _options_accepted(tuple(options.items())):
        return None
    return options


@functools.cache
def _options_accepted(options: tuple) -> bool:
    """Whether XLA:CPU compiles a trivial program with `options` (unknown options fail to compile)."""
    try:
        probe = jax.device_put(np.zeros(2, np.float32), jax.local_devices(backend="cpu")[0])
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(probe).compile()
    except Exception:  # noqa: BLE001 - any compile failure means: do not pass the options
        return False
    return True
