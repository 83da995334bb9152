"""The model interface (`Classifier`) and registry: `create(name, num_classes=...)` builds any registered model.

A model file registers a class (or a factory) with `register(name, **fixed)`: `fixed` are the
arguments that make the name (depth, width, patch size); every other keyword of the constructor
is an option a config may set in `config.model`, checked here once. So adding a model family
touches no other file. Every model subclasses `Classifier`: it maps `images: float32[B, H, W, 3]`
(normalised, NHWC) to `logits: float32[B, num_classes]`, computes in `dtype` with float32 params,
and answers what training asks of it (head, weight-decay exclusions, layer ids). The kernel set
(`jaxclf/kernels`) is no constructor argument: `create` gives the model its `kernels`, and the model's
forward passes run under that set, whatever blocks they call. Rematerialisation is chosen the same way:
`create(..., remat=POLICY)` (config.model.remat) makes every block whose `__call__` is decorated with
`remat_block` save only what the policy keeps and recompute the rest in the backward pass.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxclf import kernels as kernels_lib

Factory = Callable[..., nnx.Module]

_REGISTRY: dict[str, Factory] = {}
# Arguments every model takes from `create` itself; the rest are the model's own options.
_COMMON_ARGS = ("num_classes", "rngs", "dtype", "kernels", "remat")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# `remat` option -> what a rematerialised block keeps for the backward pass (jax.checkpoint_policies);
# "" keeps every activation (no rematerialisation).
REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}
_REMAT: contextvars.ContextVar[str] = contextvars.ContextVar("jaxclf_remat", default="")


def check_remat(policy: str) -> str:
    """`policy` if it names a rematerialisation policy ("" for none); ValueError listing them otherwise."""
    if policy and policy not in REMAT_POLICIES:
        raise ValueError(f"remat={policy!r}: use '' (off) or one of {', '.join(REMAT_POLICIES)}")
    return policy


@contextlib.contextmanager
def _remat(policy: str):
    token = _REMAT.set(policy)
    try:
        yield
    finally:
        _REMAT.reset(token)


def remat_block(call: Callable) -> Callable:
    """Decorates a block's `__call__`: run inside a model built with `remat=POLICY`, the block is one
    `nnx.remat` unit, so the backward pass recomputes what POLICY does not save. Non-array arguments
    (a prefix-token count) are static. Outside such a model, `call` runs as written."""

    @functools.wraps(call)
    def run(self, *args):
        policy = _REMAT.get()
        if not policy:
            return call(self, *args)
        static = tuple(i + 1 for i, arg in enumerate(args) if not isinstance(arg, jax.Array | np.ndarray))
        return nnx.remat(call, policy=REMAT_POLICIES[policy], static_argnums=static)(self, *args)

    return run


def _under_own_settings(method: Callable) -> Callable:
    """`method` run under the model's kernel set (`self.kernels`) and remat policy (`self.remat`), so every
    layer and block it reaches uses them."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with kernels_lib.use(self.kernels), _remat(self.remat):
            return method(self, *args, **kwargs)

    return run


class Classifier(nnx.Module):
    """Base of every registered model. Parameter paths are '/'-joined, e.g. `blocks/3/attn/qkv/kernel`.

    A model computes `forward_head(forward_features(images))`: features are what a teacher or Grad-CAM
    reads, the head maps them to logits; `pooled_features` is the part of the head before the classifier
    layer (what representation evaluators, kNN and probes, read). Override what differs from the other defaults; the
    trainer, the optimizer and the weight loaders ask the model rather than matching names. Every
    forward method a subclass defines runs under the model's kernel set (`kernels`, set by `create`;
    plain JAX for a model built directly) and remat policy (`remat`: its `remat_block`s rematerialised).
    """

    kernels: str = "plain"
    remat: str = ""
    _FORWARD_METHODS = ("__call__", "forward_features", "forward_head", "pooled_features")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in cls._FORWARD_METHODS:
            if name in cls.__dict__:
                setattr(cls, name, _under_own_settings(cls.__dict__[name]))

    def __call__(self, images: jax.Array) -> jax.Array:
        """images: float32[B, H, W, 3], normalised -> logits float32[B, num_classes]."""
        return self.forward_head(self.forward_features(images))

    def forward_features(self, images: jax.Array) -> jax.Array:
        """images -> the features the head reads (a map [B, h, w, C] for convnets, tokens [B, N, D] for ViTs)."""
        raise NotImplementedError(f"{type(self).__name__} must define forward_features(images)")

    def forward_head(self, features: jax.Array) -> jax.Array:
        """`forward_features`' output -> logits float32[B, num_classes] (pooling, head)."""
        raise NotImplementedError(f"{type(self).__name__} must define forward_head(features)")

    def pooled_features(self, features: jax.Array) -> jax.Array:
        """`forward_features`' output -> the pooled pre-logits float32[B, D] the classifier layer reads (timm's
        `forward_head(pre_logits=True)`)."""
        raise NotImplementedError(f"{type(self).__name__} must define pooled_features(features)")

    def head_paths(self) -> tuple[str, ...]:
        """Path prefixes of the classifier layer's params (reset for a new class count, `optim.head_lr_mult`)."""
        return ("head",)

    def no_weight_decay(self) -> tuple[str, ...]:
        """Paths of params without weight decay beyond biases and norms (every param of rank <= 1)."""
        return ()

    def layer_id(self, path: str) -> int:
        """Depth of param `path` for layer-wise lr decay: 0 for the stem/embeddings, i for block or stage
        i (from 1), one more than the last block for the final norm and head."""
        raise NotImplementedError(f"{type(self).__name__} defines no layer_id(path), which config.optim.layer_decay needs")

    def channel_groups(self) -> list:
        """The inner channels structured pruning may drop, as `jaxclf.models.channels.ChannelGroup`s; a model that
        lists them takes a `block_widths` option (one inner width per block, in order) to be rebuilt smaller."""
        raise NotImplementedError(f"{type(self).__name__} lists no channel_groups(): structured pruning supports "
                                  "the ResNet, EfficientNet and MobileNetV3 families")

    def pos_embed_prefix_tokens(self) -> int:
        """How many rows of `pos_embed` precede the patch grid (class/register tokens that have a position)."""
        return 0

    def xla_cpu_train_options(self) -> dict[str, Any]:
        """XLA:CPU compiler options for this model's train step with the "cpu" kernels (`kernels/xla_cpu.py`)."""
        return {}


def matches(path: str, prefixes: tuple[str, ...]) -> bool:
    """Whether param `path` is one of `prefixes` or lies below one of them."""
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def register(name: str, factory: Factory | None = None, **fixed: Any):
    """Register `factory(num_classes, rngs, dtype, **options)` under `name`, with `fixed` arguments bound.

    `register("resnet18", ResNet, block=BasicBlock, depths=(2, 2, 2, 2))`, or as a decorator of a factory.
    """
    if factory is None:
        return lambda f: register(name, f, **fixed) or f
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice; model names must be unique")
    _REGISTRY[name] = functools.partial(factory, **fixed) if fixed else factory
    return None


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(_REGISTRY)


def family(name: str) -> str:
    """The module that registered `name`, e.g. "jaxclf.models.resnet" for "resnet50"."""
    _check_name(name)
    factory = _REGISTRY[name]
    base = factory.func if isinstance(factory, functools.partial) else factory
    return base.__module__


def options(name: str) -> dict[str, Any]:
    """The options model `name` accepts (`config.model`), with their defaults (inspect.Parameter.empty where
    required): its constructor's own, and `kernels` and `remat`, which `create` takes for every model."""
    _check_name(name)
    factory = _REGISTRY[name]
    fixed = factory.keywords if isinstance(factory, functools.partial) else {}
    base = factory.func if isinstance(factory, functools.partial) else factory
    # A class's signature is its __init__'s (nnx.Module's metaclass hides it from inspect.signature).
    parameters = inspect.signature(base.__init__ if inspect.isclass(base) else base).parameters
    defaults = {p: v.default for p, v in parameters.items()
                if p not in (*_COMMON_ARGS, "self") and v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)}
    return {"kernels": "auto", "remat": "", **defaults, **fixed}


def create(
    name: str,
    *,
    num_classes: int,
    rngs: nnx.Rngs | None = None,
    dtype: Any = jnp.float32,
    kernels: str = "auto",
    remat: str = "",
    **kwargs: Any,
) -> Classifier:
    """Builds the registered model `name` with a `num_classes`-way head (`rngs` default `Rngs(0)`),
    computing with kernel set `kernels` ("auto": this platform's; see jaxclf/kernels) and rematerialising
    each block with policy `remat` ("": none; `REMAT_POLICIES`).

    Raises ValueError for an unknown name (suggesting the closest ones) and TypeError for an
    option the model does not accept or a model that is not a `Classifier`.
    """
    check_remat(remat)
    accepted = options(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"model {name!r} got unknown keyword argument(s) {', '.join(unknown)}; "
            f"it accepts: {', '.join(sorted(accepted)) or 'no options'}"
        )
    model = _REGISTRY[name](num_classes=num_classes, rngs=rngs if rngs is not None else nnx.Rngs(0), dtype=dtype,
                            **kwargs)
    if not isinstance(model, Classifier):
        raise TypeError(f"model {name!r} built a {type(model).__name__}; registered models subclass "
                        "jaxclf.models.Classifier (it tells training the head, weight-decay exclusions and layer ids)")
    model.kernels = kernels_lib.resolve(kernels)
    model.remat = remat
    return model


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> Classifier:
    """The model a resolved `config` names (`jaxclf.resolve`): `config.model_name` with `config.model`'s
    options, a `num_classes`-way head, computing in `config.dtype`."""
    if config.dtype not in DTYPES:
        raise ValueError(f"config.dtype={config.dtype!r}: use 'auto', 'float32' or 'bfloat16'")
    return create(config.model_name, num_classes=num_classes, rngs=nnx.Rngs(config.seed), dtype=DTYPES[config.dtype],
                  **config.model)


def _check_name(name: str) -> None:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise ValueError(f"unknown model {name!r}: {hint}available models: {', '.join(list_models())}")

