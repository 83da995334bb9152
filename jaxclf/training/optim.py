"""The optimizer: an optax chain built from `config.optim`.

clip -> update rule (SGD / AdamW / LAMB / Lion, with the learning-rate schedule and a weight-decay
mask) -> per-parameter lr multipliers (layer-wise decay, head) -> zero updates for frozen params.
Parameters are named by their path, e.g. `blocks/3/attn/qkv/kernel` or `layer2/0/conv1/kernel`;
which of them are the head, decay-free or in which layer, the model says (`models.Classifier`).
"""

from __future__ import annotations

import re

import jax
import ml_collections
import optax
from flax import nnx

from jaxclf import models
from jaxclf.models import tree_paths


class OptimConfigError(ValueError):
    """An inconsistent `config.optim`; the message names the fields."""


def _map_with_names(fn, params):
    return jax.tree_util.tree_map_with_path(lambda path, leaf: fn(tree_paths.path_name(path), leaf), params)


def warmup_steps(optim: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int) -> int:
    """The warmup length from whichever of warmup_steps / warmup_epochs / warmup_fraction is set."""
    given = {
        "warmup_steps": optim.warmup_steps,
        "warmup_epochs": optim.warmup_epochs * steps_per_epoch,
        "warmup_fraction": optim.warmup_fraction * total_steps,
    }
    set_fields = [name for name, steps in given.items() if steps]
    if len(set_fields) > 1:
        raise OptimConfigError(f"set only one of config.optim.{', config.optim.'.join(set_fields)}")
    return min(int(round(given[set_fields[0]])) if set_fields else 0, total_steps)


def make_schedule(optim: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    """Linear warmup from 0 to `optim.lr`, then cosine, linear, step or constant until `total_steps`."""
    warmup = warmup_steps(optim, total_steps, steps_per_epoch)
    decay_steps = max(total_steps - warmup, 1)
    end_lr = optim.lr * optim.end_lr_fraction
    if optim.schedule == "cosine":
        decay = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=optim.end_lr_fraction)
    elif optim.schedule == "linear":
        decay = optax.linear_schedule(optim.lr, end_lr, decay_steps)
    elif optim.schedule == "step":
        drops = [e * steps_per_epoch for e in optim.step_epochs] + [f * total_steps for f in optim.step_fractions]
        if bool(optim.step_epochs) == bool(optim.step_fractions):
            raise OptimConfigError(
                "config.optim.schedule='step' needs one of config.optim.step_epochs, e.g. (30, 60), "
                "or config.optim.step_fractions, e.g. (0.3, 0.6, 0.9)"
            )
        boundaries = {int(round(d)) - warmup: optim.step_factor for d in drops}
        decay = optax.piecewise_constant_schedule(optim.lr, boundaries)
    elif optim.schedule == "constant":
        decay = optax.constant_schedule(optim.lr)
    else:
        raise OptimConfigError(
            f"config.optim.schedule={optim.schedule!r}: use 'cosine', 'linear', 'step' or 'constant'"
        )
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), decay], [warmup])


def weight_decay_mask(model: models.Classifier):
    """A mask function for optax: True for weight matrices and conv kernels; False for params of rank <= 1
    (biases, norms) and those the model names in `no_weight_decay()` (position embeddings, tokens)."""
    no_decay = model.no_weight_decay()
    return lambda params: _map_with_names(lambda name, leaf: leaf.ndim > 1 and not models.matches(name, no_decay), params)


def lr_multipliers(optim: ml_collections.ConfigDict, model: models.Classifier):
    """Per-parameter learning-rate multipliers: layer_decay ** (depth from the top, `model.layer_id`), times
    head_lr_mult on the head (`model.head_paths()`, or the params matching `optim.head_regex`)."""
    params = nnx.state(model, nnx.Param)
    top = max(model.layer_id(name) for name in tree_paths.flatten(params)) if optim.layer_decay else 0
    head_regex = re.compile(optim.head_regex) if optim.head_regex else None
    head_paths = model.head_paths()

    def multiplier(name: str, leaf) -> float:
        scale = optim.layer_decay ** (top - model.layer_id(name)) if optim.layer_decay else 1.0
        if head_regex.search(name) if head_regex else models.matches(name, head_paths):
            scale *= optim.head_lr_mult
        return scale

    return _map_with_names(multiplier, params)


def frozen_mask(optim: ml_collections.ConfigDict, model: nnx.Module):
    """True for the parameters training leaves unchanged: those matching `optim.freeze` (a regex searched in
    the parameter path) and, in a model holding LoRA adapters (`nnx.LoRAParam`, jaxclf/models/peft.py), every
    parameter that is neither an adapter's nor the head's."""
    params = nnx.state(model, nnx.Param)
    pattern = re.compile(optim.freeze) if optim.freeze else None
    adapters = set(tree_paths.flatten(nnx.state(model, nnx.LoRAParam)))
    head = model.head_paths()

    def frozen(name: str, _) -> bool:
        if pattern is not None and pattern.search(name):
            return True
        return bool(adapters) and name not in adapters and not models.matches(name, head)

    return _map_with_names(frozen, params)


def _update_rule(optim: ml_collections.ConfigDict, schedule: optax.Schedule, weight_decay_mask
                 ) -> optax.GradientTransformation:
    if optim.name == "sgd":
        # Coupled (L2) weight decay, as torch.optim.SGD applies it.
        return optax.chain(
            optax.add_decayed_weights(optim.weight_decay, mask=weight_decay_mask),
            optax.sgd(schedule, momentum=optim.momentum or None, nesterov=optim.nesterov),
        )
    if optim.name == "adamw":
        return optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay, mask=weight_decay_mask)
    if optim.name == "lamb":
        return optax.lamb(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay, mask=weight_decay_mask)
    if optim.name == "lion":
        return optax.lion(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay, mask=weight_decay_mask)
    raise OptimConfigError(f"config.optim.name={optim.name!r}: use 'sgd', 'adamw', 'lamb' or 'lion'")


def _scale(updates, multipliers):
    """`updates` times `multipliers`, leaf by leaf; under `optim.freeze` (optax.partition) frozen leaves
    arrive as `optax.MaskedNode` and stay so."""
    return jax.tree.map(lambda m, u: u if isinstance(u, optax.MaskedNode) else u * m, multipliers, updates)


def make_optimizer(
    optim: ml_collections.ConfigDict, model: models.Classifier, total_steps: int, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Return the optax transformation for `config.optim` over `model`'s params and its learning-rate schedule.

    Frozen parameters (`frozen_mask`: optim.freeze, a LoRA model's base) get `set_to_zero` through
    `optax.partition`, so they never change and hold no optimizer state (no momentum buffers for a
    linear probe's backbone); the train step computes no gradient for them (`steps.make_train_step`).
    """
    schedule = make_schedule(optim, total_steps, steps_per_epoch)
    chain = []
    if optim.clip_grad_norm:
        chain.append(optax.clip_by_global_norm(optim.clip_grad_norm))
    chain.append(_update_rule(optim, schedule, weight_decay_mask(model)))
    if optim.layer_decay or optim.head_lr_mult != 1.0:
        multipliers = lr_multipliers(optim, model)
        chain.append(optax.stateless(lambda updates, _: _scale(updates, multipliers)))
    tx = optax.chain(*chain)
    frozen = frozen_mask(optim, model)
    if any(jax.tree.leaves(frozen)):
        if all(jax.tree.leaves(frozen)):
            raise OptimConfigError(f"config.optim.freeze={optim.freeze!r} freezes every parameter")
        labels = jax.tree.map(lambda f: "frozen" if f else "trained", frozen)
        tx = optax.partition({"trained": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule
