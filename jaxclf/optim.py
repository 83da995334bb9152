"""The optimizer: an optax chain built from `config.optim`.

clip -> update rule (SGD / AdamW / LAMB / Lion, with the learning-rate schedule and a weight-decay
mask) -> per-parameter lr multipliers (layer-wise decay, head) -> zero updates for frozen params.
Parameters are named by their path, e.g. `blocks/3/attn/qkv/kernel` or `layer2/0/conv1/kernel`.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxclf import tree_paths

# Parameters whose name ends with one of these get no weight decay, whatever their rank.
NO_DECAY_NAMES = ("pos_embed", "cls_token")


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


def weight_decay_mask(params):
    """True for weight matrices and conv kernels; False for biases, norms, position embeddings, class token."""
    return _map_with_names(lambda name, leaf: leaf.ndim > 1 and not name.endswith(NO_DECAY_NAMES), params)


def layer_index(name: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise lr decay: 0 for the stem/embeddings, i+1 for block or stage i,
    `num_layers + 1` for the final norm and head."""
    match = re.match(r"(?:blocks|layer)/?(\d+)/", name)
    if match:
        index = int(match.group(1))
        # torchvision stages are named layer1..layer4; ViT blocks are blocks/0..blocks/N-1.
        return index if name.startswith("layer") else index + 1
    if re.match(r"(patch_embed|cls_token|pos_embed|conv1|bn1)(/|$)", name):
        return 0
    return num_layers + 1


def lr_multipliers(optim: ml_collections.ConfigDict, params):
    """Per-parameter learning-rate multipliers: layer_decay ** (depth from the top), times head_lr_mult on the head."""
    names = [tree_paths.path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    depths = [layer_index(name, 0) for name in names]
    num_layers = max([d for d in depths] + [0])  # blocks/stages present in this model
    head = re.compile(optim.head_regex)

    def multiplier(name: str, leaf) -> float:
        scale = 1.0
        if optim.layer_decay:
            scale = optim.layer_decay ** (num_layers + 1 - layer_index(name, num_layers))
        if head.search(name):
            scale *= optim.head_lr_mult
        return scale

    return _map_with_names(multiplier, params)


def frozen_mask(optim: ml_collections.ConfigDict, params):
    """True for parameters matching `optim.freeze` (a regex searched in the parameter path)."""
    if not optim.freeze:
        return jax.tree.map(lambda _: False, params)
    pattern = re.compile(optim.freeze)
    return _map_with_names(lambda name, _: bool(pattern.search(name)), params)


def _update_rule(optim: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
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


def make_optimizer(
    optim: ml_collections.ConfigDict, params, total_steps: int, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Return the optax transformation for `config.optim` over `params` and its learning-rate schedule.

    Frozen parameters get `set_to_zero` through `optax.partition`, so they never change and hold
    no optimizer state (no momentum buffers for a linear probe's backbone).
    """
    schedule = make_schedule(optim, total_steps, steps_per_epoch)
    chain = []
    if optim.clip_grad_norm:
        chain.append(optax.clip_by_global_norm(optim.clip_grad_norm))
    chain.append(_update_rule(optim, schedule))
    if optim.layer_decay or optim.head_lr_mult != 1.0:
        multipliers = lr_multipliers(optim, params)
        chain.append(optax.stateless(lambda updates, _: jax.tree.map(jnp.multiply, updates, multipliers)))
    tx = optax.chain(*chain)
    if optim.freeze:
        frozen = frozen_mask(optim, params)
        if all(jax.tree.leaves(frozen)):
            raise OptimConfigError(f"config.optim.freeze={optim.freeze!r} freezes every parameter")
        labels = jax.tree.map(lambda f: "frozen" if f else "trained", frozen)
        tx = optax.partition({"trained": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule
