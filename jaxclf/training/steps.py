"""Pure train and eval steps. `make_*_step` close over what is static and return `jax.jit`-ed functions.

The model travels as an NNX graphdef (static) plus state pytrees; it is rebuilt with `nnx.merge`
inside the jitted function, so no Python graph walk happens per step and shardings are explicit.
Everything random in a step derives from `fold_in(key(config.seed), step)`, so a resumed run
draws the same numbers as an uninterrupted one. The loss is a sum of terms built once from the
config by the run's tasks (`jaxclf.tasks`); a term that is off is not in the sum, so it costs
nothing. Arrays a term reads but does not train (a distillation teacher's variables) are
`Loss.frozen`: the step takes them as an argument, sharded like the params.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxclf.training import augment, sharding
from jaxclf.data.normalize import normalize_images
from jaxclf.kernels import xla_cpu


@flax.struct.dataclass
class TrainState:
    """Everything a training run changes, as one pytree (what a checkpoint stores)."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: nnx.State  # the model's nnx.Param variables
    model_state: nnx.State  # every other variable: BatchNorm statistics, RNG counters
    opt_state: optax.OptState
    ema_params: nnx.State | None = None  # exponential moving average of params (config.ema_decay > 0)


def create_train_state(
    model: nnx.Module, tx: optax.GradientTransformation, *, ema: bool = False, freeze_bn_stats: bool = False,
    abstract: bool = False,
) -> tuple[nnx.GraphDef, nnx.GraphDef, TrainState]:
    """Split `model` into (train-mode graphdef, eval-mode graphdef, initial state).

    `freeze_bn_stats` keeps BatchNorm on its running statistics during training too (they are
    neither used from the batch nor updated), the usual choice for small-batch fine-tuning. With
    `abstract`, `model` is an `nnx.eval_shape` one and the state holds only shapes (ShapeDtypeStruct).
    """
    model.eval()
    eval_graphdef = nnx.graphdef(model)
    model.train()
    if freeze_bn_stats:
        for _, module in nnx.iter_modules(model):
            if isinstance(module, nnx.BatchNorm):
                module.use_running_average = True
    train_graphdef, params, model_state = nnx.split(model, nnx.Param, ...)

    def initial_state(params: nnx.State, model_state: nnx.State) -> TrainState:
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                          opt_state=tx.init(params), ema_params=jax.tree.map(jnp.copy, params) if ema else None)

    state = jax.eval_shape(initial_state, params, model_state) if abstract else initial_state(params, model_state)
    return train_graphdef, eval_graphdef, state


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy in float32 against int labels, with optional smoothing. Shape [B]."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def example_weights(targets: jax.Array, class_weights: jax.Array | None) -> jax.Array:
    """float32[B]: each example's weight in the loss, its (soft) target's class weight, or 1.

    The loss is sum(losses * weights) / sum(weights) over the whole batch, as torch's
    CrossEntropyLoss(weight=...) computes it.
    """
    if class_weights is None:
        return jnp.ones(targets.shape[0], jnp.float32)
    return targets @ class_weights


@flax.struct.dataclass
class LossInputs:
    """What every loss term may read, for one (micro-)batch: the model's float32 logits [B, C], the
    (smoothed, mixed) targets [B, C], the normalised (mixed) images, each example's weight with
    the whole batch's weight sum (so micro-batches add up to the batch), and `Loss.frozen` on the mesh."""

    logits: jax.Array
    targets: jax.Array
    images: jax.Array
    weights: jax.Array
    weight_sum: jax.Array
    frozen: dict = dataclasses.field(default_factory=dict)


LossTerm = Callable[[LossInputs], jax.Array]


def weighted_cross_entropy(inputs: LossInputs) -> jax.Array:
    """sum(cross-entropy(logits, targets) * weights) / weight_sum."""
    losses = optax.softmax_cross_entropy(inputs.logits, inputs.targets)
    return jnp.sum(losses * inputs.weights) / inputs.weight_sum


def _scaled(term: LossTerm, factor: float) -> LossTerm:
    return lambda inputs: factor * term(inputs)


@dataclasses.dataclass(frozen=True)
class Loss:
    """A sum of named terms, each a function of `LossInputs` to a scalar; `class_weights` feed the example
    weights; `frozen` maps names to fixed arrays terms read (a teacher's variables), given to the step."""

    terms: tuple[tuple[str, LossTerm], ...]
    class_weights: jax.Array | None = None
    frozen: dict = dataclasses.field(default_factory=dict)

    def __call__(self, inputs: LossInputs) -> jax.Array:
        return functools.reduce(operator.add, self.parts(inputs).values())

    def parts(self, inputs: LossInputs) -> dict[str, jax.Array]:
        """Each term's value, by name."""
        return {name: term(inputs) for name, term in self.terms}

    def plus(self, name: str, term: LossTerm, frozen: dict | None = None) -> Loss:
        """This loss with one more term (and the fixed arrays it reads, by name)."""
        if name in dict(self.terms) or set(frozen or {}) & set(self.frozen):
            raise ValueError(f"the loss already has a term or frozen arrays named {name!r}")
        return dataclasses.replace(self, terms=(*self.terms, (name, term)), frozen={**self.frozen, **(frozen or {})})

    def scaled(self, factor: float) -> Loss:
        """`factor` times every term so far (none, when `factor` is 0)."""
        if factor == 1:
            return self
        terms = () if factor == 0 else tuple((name, _scaled(term, factor)) for name, term in self.terms)
        return dataclasses.replace(self, terms=terms)


def cross_entropy_loss(class_weights: jax.Array | None = None) -> Loss:
    """Plain classification's loss: the cross-entropy against the (smoothed, mixed, class-weighted) targets."""
    return Loss(terms=(("cross_entropy", weighted_cross_entropy),), class_weights=class_weights)


def train_compiler_options(model: nnx.Module) -> dict:
    """The model's own XLA:CPU train-step options, with the "cpu" kernel set (`jaxclf/kernels`), and with a
    remat policy the option that keeps XLA:CPU from undoing it (`xla_cpu.REMAT_TRAIN_OPTIONS`)."""
    options = model.xla_cpu_train_options() if getattr(model, "kernels", "plain") == "cpu" else {}
    return {**options, **(xla_cpu.REMAT_TRAIN_OPTIONS if getattr(model, "remat", "") else {})}


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    config: ml_collections.ConfigDict,
    num_classes: int,
    state_sharding,
    loss: Loss,
    compiler_options: dict | None = None,
    frozen_params=None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Return `step(state, batch) -> (state, metrics)` minimising `loss`, jitted over `mesh`; `state` is donated.

    `state_sharding` (see `sharding.state_sharding`) lays the state out on the mesh; the batch is
    split on the `data` axis and the metrics come back replicated. `compiler_options`: the model's
    XLA:CPU options for this step (`kernels/xla_cpu.py`), on top of every CPU program's.

    Reads from `config`: data.mean/std, label_smoothing, mixup_alpha, cutmix_alpha, mix_prob,
    mix_switch_prob, optim.accumulate_steps, ema_decay, nonfinite_loss, seed, param_sharding. With
    nonfinite_loss="skip", a step whose loss or gradients are NaN/Inf leaves the state unchanged
    (metrics["skipped"] = 1) instead of poisoning the parameters. A loss of several terms also
    reports each (metrics["loss_<name>"]); `loss.frozen` goes to the mesh once, laid out like the
    params, and into every step as an argument. `frozen_params` (`optim.frozen_mask`: True for a
    param training leaves unchanged) keeps those out of the differentiation: no gradient is computed
    for them (a zero stands in, for the optimizer's tree), and `grad_norm` is the trained params'.
    """
    mean, std = tuple(config.data.mean), tuple(config.data.std)
    accumulate = config.optim.accumulate_steps
    trained = None if frozen_params is None else [not f for f in jax.tree.leaves(frozen_params)]

    def grads_and_metrics(params, model_state, images, targets, labels, weights, weight_sum, frozen):
        """Gradients of `loss`, whose terms divide by `weight_sum`: the whole batch's, so
        micro-batches' losses and gradients add up to the batch's."""
        def loss_fn(trained_leaves):
            # copy=True makes fresh variables in this (grad) trace, so BatchNorm may update them.
            model = nnx.merge(graphdef, _with_leaves(params, trained, trained_leaves), model_state, copy=True)
            logits = model(images).astype(jnp.float32)
            parts = loss.parts(LossInputs(logits, targets, images, weights, weight_sum, frozen))
            value = functools.reduce(operator.add, parts.values())
            return value, (logits, nnx.state(model, nnx.Not(nnx.Param)), parts if len(parts) > 1 else {})

        (value, (logits, model_state, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            _selected_leaves(params, trained))
        zeros = jax.tree.map(jnp.zeros_like, params)
        grads = _with_leaves(zeros, trained, grads)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        return grads, model_state, value, accuracy, parts

    def train_step(state: TrainState, batch: dict, frozen: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.key(config.seed), state.step)
        images = normalize_images(batch["image"], mean, std)
        targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes), config.label_smoothing)
        images, targets = augment.mixup_cutmix(
            key,
            images,
            targets,
            mixup_alpha=config.mixup_alpha,
            cutmix_alpha=config.cutmix_alpha,
            mix_prob=config.mix_prob,
            switch_prob=config.mix_switch_prob,
        )
        weights = example_weights(targets, loss.class_weights)
        # A batch of only zero-weight classes has loss 0 and no gradient, not 0/0.
        weight_sum = jnp.maximum(weights.sum(), jnp.finfo(jnp.float32).tiny)
        if accumulate == 1:
            grads, model_state, loss_value, accuracy, parts = grads_and_metrics(
                state.params, state.model_state, images, targets, batch["label"], weights, weight_sum, frozen
            )
        else:
            grads, model_state, loss_value, accuracy, parts = _accumulated(
                functools.partial(grads_and_metrics, frozen=frozen), state, accumulate, images, targets,
                batch["label"], weights, weight_sum,
            )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = state.ema_params
        if ema_params is not None:
            decay = config.ema_decay
            ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
        grad_norm = optax.tree.norm(_selected_leaves(grads, trained))
        new_state = TrainState(
            step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state, ema_params=ema_params
        )
        skipped = jnp.zeros((), jnp.int32)
        if config.nonfinite_loss == "skip":
            finite = jnp.isfinite(loss_value) & jnp.isfinite(grad_norm)
            kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
            new_state = kept.replace(step=new_state.step)  # the step counts, the update does not
            skipped = 1 - finite.astype(jnp.int32)
        metrics = {"loss": loss_value, "accuracy": accuracy, "grad_norm": grad_norm, "skipped": skipped,
                   **{f"loss_{name}": value for name, value in parts.items()}}
        return new_state, metrics

    jit_options = dict(
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=0,
        compiler_options=xla_cpu.compiler_options(mesh.devices.flat[0].platform, compiler_options),
    )
    if not loss.frozen:
        return jax.jit(functools.partial(train_step, frozen={}),
                       in_shardings=(state_sharding, sharding.batch_sharded(mesh)), **jit_options)
    frozen_sharding = sharding.state_sharding(loss.frozen, mesh, config.param_sharding)
    jitted = jax.jit(train_step, in_shardings=(state_sharding, sharding.batch_sharded(mesh), frozen_sharding),
                     **jit_options)
    frozen = jax.device_put(loss.frozen, frozen_sharding)
    step = lambda state, batch: jitted(state, batch, frozen)  # noqa: E731
    step.lower = lambda state, batch: jitted.lower(state, batch, frozen)  # for compiling ahead (training/memory.py)
    return step


def _selected_leaves(tree, selected: list[bool] | None) -> list:
    """The leaves of `tree` where `selected` is True (all of them for None)."""
    leaves = jax.tree.leaves(tree)
    return leaves if selected is None else [leaf for leaf, keep in zip(leaves, selected) if keep]


def _with_leaves(tree, selected: list[bool] | None, replacements: list):
    """`tree` with its `selected` leaves replaced, in order, by `replacements` (`_selected_leaves`' inverse)."""
    leaves, treedef = jax.tree.flatten(tree)
    if selected is None:
        return treedef.unflatten(replacements)
    given = iter(replacements)
    return treedef.unflatten([next(given) if keep else leaf for leaf, keep in zip(leaves, selected)])


def _accumulated(grads_and_metrics, state: TrainState, k: int, images, targets, labels, weights, weight_sum):
    """The batch's gradients as the sum over k micro-batches run one after another (k times less
    activation memory); each micro-batch's loss is normalised by the whole batch's weight sum.

    Micro-batch j takes rows j, j+k, j+2k, ...: a reshape that keeps every device's rows on that
    device, so each micro-batch is still split over the whole mesh. BatchNorm statistics advance
    micro-batch by micro-batch, as in PyTorch's accumulation loops.
    """
    batch = images.shape[0]
    if batch % k:
        raise ValueError(f"config.optim.accumulate_steps={k} must divide the per-step batch of {batch}")

    def micro(x):
        return jnp.moveaxis(x.reshape(batch // k, k, *x.shape[1:]), 1, 0)

    def body(carry, xs):
        grad_sum, model_state = carry
        grads, model_state, loss, accuracy, parts = grads_and_metrics(state.params, model_state, *xs, weight_sum)
        return (jax.tree.map(jnp.add, grad_sum, grads), model_state), (loss, accuracy, parts)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grad_sum, model_state), (losses, accuracies, parts) = jax.lax.scan(
        body, (zeros, state.model_state), (micro(images), micro(targets), micro(labels), micro(weights))
    )
    return grad_sum, model_state, losses.sum(), accuracies.mean(), jax.tree.map(jnp.sum, parts)


def make_eval_step(
    graphdef: nnx.GraphDef, mesh: Mesh, state_sharding, *, mean: Sequence[float], std: Sequence[float],
    class_groups: dict[str, Sequence[int]] | None = None,
) -> Callable[[nnx.State, nnx.State, dict, dict], dict]:
    """Return `step(params, model_state, batch, totals) -> totals`: sums of loss and top-1/top-5 hits
    over unmasked rows, and for each of `class_groups` (name -> class ids, e.g. continual learning's
    old and new classes) `<name>_top1` and `<name>_count` over its rows.

    Sums stay on the device across batches (`totals` is donated), so evaluation syncs with the
    host once, at the end. Pass `state.ema_params` as `params` to evaluate the EMA model.
    """

    def eval_step(params: nnx.State, model_state: nnx.State, batch: dict, totals: dict) -> dict:
        model = nnx.merge(graphdef, params, model_state)
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
        for name, members in (class_groups or {}).items():
            in_group = jnp.zeros(logits.shape[-1], jnp.float32).at[jnp.asarray(members, jnp.int32)].set(1.0)[labels]
            batch_sums[f"{name}_top1"] = jnp.sum((top_k[:, 0] == labels) * mask * in_group)
            batch_sums[f"{name}_count"] = jnp.sum(mask * in_group)
        return jax.tree.map(jnp.add, totals, batch_sums)

    replicated = sharding.replicated(mesh)
    return jax.jit(
        eval_step,
        in_shardings=(
            state_sharding.params, state_sharding.model_state, sharding.batch_sharded(mesh), replicated
        ),
        out_shardings=replicated,
        donate_argnums=3,
        compiler_options=xla_cpu.compiler_options(mesh.devices.flat[0].platform),
    )


def zero_eval_totals(mesh: Mesh, class_groups: Sequence[str] = ()) -> dict:
    """The starting `totals` of `make_eval_step` (with those `class_groups`), replicated on `mesh`."""
    names = ("loss", "top1", "top5", "count", *(f"{g}_{k}" for g in class_groups for k in ("top1", "count")))
    zeros = {name: jnp.zeros((), jnp.float32) for name in names}
    return jax.device_put(zeros, sharding.replicated(mesh))
