"""XLA:CPU compiler options for jaxclf's jitted steps: which kernel library runs which op.

jax 0.10's XLA:CPU hands convolutions, matmuls and elementwise ops to YNNPACK by default. On the
2-core machines of bench/README.md, ResNet-18's train step ran 1.8x faster with YNNPACK doing only
reductions (BatchNorm statistics), XNNPACK the matmuls and XLA's own Eigen kernels the
convolutions; ViTs ran the same, and their train step ~12% faster without XLA's
concurrency-optimised scheduler; bottleneck ResNets' train step ~13% faster with YNNPACK matmuls
(runs in bench/README.md). GPU programs get no options.
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
# ViT train steps: XLA's concurrency-optimised scheduler runs independent ops side by side; on two
# cores that made the ViT-S step ~12% slower (5 alternated pairs) and ResNet-18's ~5% faster.
VIT_TRAIN_OPTIONS = {"xla_cpu_enable_concurrency_optimized_scheduler": False}
# Train steps of bottleneck ResNets, whose 1x1 convs are matmuls on CPU (layers.pointwise_conv):
# with YNNPACK running those matmuls the ResNet-50 step was ~13% faster (3 alternated pairs); the
# ResNet-18 and ViT-S steps were not faster with it, so only these models get it.
BOTTLENECK_TRAIN_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_DOT"}
BOTTLENECK_MODELS = ("resnet50", "resnet101", "resnet152")


def compiler_options(platform: str, train_model_name: str | None = None) -> dict | None:
    """XLA:CPU options for programs on `platform` "cpu", else None (pass as `jax.jit(..., compiler_options=)`).

    `CPU_OPTIONS`, plus `VIT_TRAIN_OPTIONS` or `BOTTLENECK_TRAIN_OPTIONS` for the train step of
    a ViT or of `BOTTLENECK_MODELS` (`train_model_name`).
    None as well when XLA_FLAGS already names an option (the user's choice wins) or when this
    jaxlib does not know them (they are experimental flags and may be renamed).
    """
    if platform != "cpu":
        return None
    options = dict(CPU_OPTIONS)
    if train_model_name is not None and train_model_name.startswith("vit_"):
        options.update(VIT_TRAIN_OPTIONS)
    if train_model_name in BOTTLENECK_MODELS:
        options.update(BOTTLENECK_TRAIN_OPTIONS)
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
