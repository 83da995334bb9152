"""Pure train and eval steps. `make_*_step` close over what is static and return `jax.jit`-ed functions.

The model travels as an NNX graphdef (static) plus state pytrees; it is rebuilt with `nnx.merge`
inside the jitted function, so no Python graph walk happens per step and shardings are explicit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxclf import sharding


@flax.struct.dataclass
class TrainState:
    """Everything a training run changes, as one pytree (what a checkpoint stores)."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: nnx.State  # the model's nnx.Param variables
    model_state: nnx.State  # every other variable: BatchNorm statistics, RNG counters
    opt_state: optax.OptState


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation) -> tuple[nnx.GraphDef, nnx.GraphDef, TrainState]:
    """Split `model` into (train-mode graphdef, eval-mode graphdef, initial state)."""
    model.eval()
    eval_graphdef = nnx.graphdef(model)
    model.train()
    train_graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state, opt_state=tx.init(params))
    return train_graphdef, eval_graphdef, state


def normalize_images(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """uint8[B, H, W, 3] in 0..255 -> float32 (images / 255 - mean) / std, done on the device."""
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (images.astype(jnp.float32) / 255.0 - mean) / std


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy in float32, with optional label smoothing. Shape [B]."""
    num_classes = logits.shape[-1]
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    label_smoothing: float,
    skip_nonfinite: bool = False,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Return `step(state, batch) -> (state, metrics)`, jitted over `mesh`; `state` is donated.

    With `skip_nonfinite`, a step whose loss or gradients are NaN/Inf leaves the state unchanged
    (metrics["skipped"] = 1) instead of poisoning the parameters.
    """

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        images = normalize_images(batch["image"], mean, std)

        def loss_fn(params):
            # copy=True makes fresh variables in this (grad) trace, so BatchNorm may update them.
            model = nnx.merge(graphdef, params, state.model_state, copy=True)
            logits = model(images)
            loss = cross_entropy(logits, batch["label"], label_smoothing).mean()
            return loss, (logits, nnx.state(model, nnx.Not(nnx.Param)))

        (loss, (logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        new_state = TrainState(step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state)
        skipped = jnp.zeros((), jnp.int32)
        if skip_nonfinite:
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
            new_state = kept.replace(step=new_state.step)  # the step counts, the update does not
            skipped = 1 - finite.astype(jnp.int32)
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
            "grad_norm": grad_norm,
            "skipped": skipped,
        }
        return new_state, metrics

    state_sharding = sharding.replicated(mesh)
    return jax.jit(
        train_step,
        in_shardings=(state_sharding, sharding.batch_sharded(mesh)),
        out_shardings=(state_sharding, state_sharding),
        donate_argnums=0,
    )


def make_eval_step(
    graphdef: nnx.GraphDef, mesh: Mesh, *, mean: Sequence[float], std: Sequence[float]
) -> Callable[[TrainState, dict, dict], dict]:
    """Return `step(state, batch, totals) -> totals`: sums of loss and top-1/top-5 hits over unmasked rows.

    Sums stay on the device across batches (`totals` is donated), so evaluation syncs with the
    host once, at the end.
    """

    def eval_step(state: TrainState, batch: dict, totals: dict) -> dict:
        model = nnx.merge(graphdef, state.params, state.model_state)
        logits = model(normalize_images(batch["image"], mean, std)).astype(jnp.float32)
        labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
        k = min(5, logits.shape[-1])
        top_k = jax.lax.top_k(logits, k)[1]
        batch_sums = {
            "loss": jnp.sum(cross_entropy(logits, labels) * mask),
            "top1": jnp.sum((top_k[:, 0] == labels) * mask),
            "top5": jnp.sum(jnp.any(top_k == labels[:, None], axis=-1) * mask),
            "count": jnp.sum(mask),
        }
        return jax.tree.map(jnp.add, totals, batch_sums)

    replicated = sharding.replicated(mesh)
    return jax.jit(
        eval_step,
        in_shardings=(replicated, sharding.batch_sharded(mesh), replicated),
        out_shardings=replicated,
        donate_argnums=2,
    )


def zero_eval_totals(mesh: Mesh) -> dict:
    """The starting `totals` of `make_eval_step`, replicated on `mesh`."""
    zeros = {name: jnp.zeros((), jnp.float32) for name in ("loss", "top1", "top5", "count")}
    return jax.device_put(zeros, sharding.replicated(mesh))
