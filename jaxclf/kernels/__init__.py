"""Kernel sets: the formulations behind the layer API of `jaxclf/models/layers.py`.

A model computes with plain JAX (`kernels="plain"`), the reference every other set must agree
with in value and gradient (tests/test_kernels.py). The fast sets swap formulations that compute
the same function faster on one platform:

- "cpu": hand-written gradients and im2col/matmul convolutions that XLA:CPU runs faster
  (`kernels/cpu.py`), plus per-model XLA:CPU compiler options for the train step.
- "gpu": plain JAX, with cuDNN's fused attention in 16-bit on NVIDIA GPUs (`kernels/cudnn.py`).

"auto" resolves once, from the platform the program runs on (`resolve`); a run records the
resolved name in its config.json. The set is chosen by context, not threaded through constructors:
the layer API computes with `active()`, the set of the innermost `use(name)` (plain JAX outside any),
and a `Classifier` runs its forward passes under its own `kernels` (jaxclf/models/base.py). The choice
happens while jax traces, so a jitted function must enter `use` inside itself, as models do.
Adding a set is one `KernelSet` in `KERNEL_SETS`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator

import jax

from jaxclf.kernels import cpu, cudnn, plain

KERNEL_CHOICES = ("auto", "plain", "cpu", "gpu")


@dataclasses.dataclass(frozen=True)
class KernelSet:
    """One formulation of each op the layer API offers; each has plain JAX's signature and result."""

    name: str
    dot_general: Callable  # jax.lax.dot_general, for Linear
    conv_general_dilated: Callable  # jax.lax.conv_general_dilated, for Conv
    max_pool_3x3_s2: Callable  # (x [B, H, W, C], pad_value) -> [B, ceil(H/2), ceil(W/2), C]
    attention: Callable  # fused qkv [B, N, 3, heads, head_dim] -> [B, N, heads, head_dim]
    tuned_compiler_options: bool  # whether the model's own XLA:CPU train-step options apply


KERNEL_SETS = {
    "plain": KernelSet("plain", jax.lax.dot_general, jax.lax.conv_general_dilated, plain.max_pool_3x3_s2,
                       plain.attention, tuned_compiler_options=False),
    "cpu": KernelSet("cpu", cpu.linear_dot_general, cpu.conv_general_dilated, cpu.max_pool_3x3_s2,
                     cpu.softmax_attention, tuned_compiler_options=True),
    "gpu": KernelSet("gpu", jax.lax.dot_general, jax.lax.conv_general_dilated, plain.max_pool_3x3_s2,
                     cudnn.attention, tuned_compiler_options=False),
}


def resolve(name: str, platform: str | None = None) -> str:
    """`name` with "auto" replaced by the set for `platform` (default: JAX's default backend):
    "cpu" on CPUs, "gpu" on GPUs, "plain" elsewhere."""
    if name not in KERNEL_CHOICES:
        raise ValueError(f"kernels={name!r}: use one of {', '.join(KERNEL_CHOICES)}")
    if name != "auto":
        return name
    platform = platform or jax.default_backend()
    return {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu"}.get(platform, "plain")


def get(name: str) -> KernelSet:
    """The kernel set `name` ("auto" resolved for the default backend)."""
    return KERNEL_SETS[resolve(name)]


_ACTIVE: contextvars.ContextVar[str] = contextvars.ContextVar("jaxclf_kernel_set", default="plain")


@contextlib.contextmanager
def use(name: str) -> Iterator[KernelSet]:
    """Compute the layer API's ops with kernel set `name` ("auto" resolved) inside this block."""
    token = _ACTIVE.set(resolve(name))
    try:
        yield KERNEL_SETS[_ACTIVE.get()]
    finally:
        _ACTIVE.reset(token)


def active() -> KernelSet:
    """The kernel set of the innermost `use` block; plain JAX outside any."""
    return KERNEL_SETS[_ACTIVE.get()]
