"""The optimizer: an optax chain built from `config.optim` (schedule, weight decay mask, update rule)."""

from __future__ import annotations

import jax
import ml_collections
import optax

# Parameters whose name ends with one of these get no weight decay, whatever their rank.
NO_DECAY_NAMES = ("pos_embed", "cls_token")


def make_schedule(optim: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
    """Linear warmup from 0 to `optim.lr`, then cosine, linear or constant until `total_steps`."""
    warmup_steps = min(int(round(optim.warmup_epochs * steps_per_epoch)), total_steps)
    decay_steps = max(total_steps - warmup_steps, 1)
    end_lr = optim.lr * optim.end_lr_fraction
    if optim.schedule == "cosine":
        decay = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=optim.end_lr_fraction)
    elif optim.schedule == "linear":
        decay = optax.linear_schedule(optim.lr, end_lr, decay_steps)
    elif optim.schedule == "constant":
        decay = optax.constant_schedule(optim.lr)
    else:
        raise ValueError(f"config.optim.schedule={optim.schedule!r}: use 'cosine', 'linear' or 'constant'")
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, optim.lr, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def weight_decay_mask(params):
    """True for weight matrices and conv kernels; False for biases, norms, position embeddings, class token."""

    def decays(path, leaf) -> bool:
        name = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        return leaf.ndim > 1 and not name.endswith(NO_DECAY_NAMES)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    optim: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Return the optax transformation for `config.optim` and its learning-rate schedule."""
    schedule = make_schedule(optim, total_steps, steps_per_epoch)
    if optim.name == "sgd":
        # Coupled (L2) weight decay, as torch.optim.SGD applies it.
        tx = optax.chain(
            optax.add_decayed_weights(optim.weight_decay, mask=weight_decay_mask),
            optax.sgd(schedule, momentum=optim.momentum or None, nesterov=optim.nesterov),
        )
    elif optim.name == "adamw":
        tx = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay, mask=weight_decay_mask)
    else:
        raise ValueError(f"config.optim.name={optim.name!r}: use 'sgd' or 'adamw'")
    return tx, schedule
