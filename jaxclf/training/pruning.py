"""Gradual magnitude pruning (Zhu & Gupta, 2017) as an optax transformation: `config.prune`.

The target sparsity follows the cubic schedule s_t = s_f + (s_i - s_f) (1 - (t - start) / (end - start))^3
from step `start` to `end`, recomputed every `every` steps (and at `end`, so `end` reaches s_f exactly).
The masks live in this transformation's state, hence in the optimizer state a checkpoint stores: a run
killed and resumed continues with the same masks. Every update is masked; on a pruning step the mask is
recomputed from the magnitude of the updated weights (pruned weights rank below every kept one, so a mask
only loses entries) and the weights it drops are set to exactly zero. Everything runs inside the jitted
step; the sort of a pruning step runs only on those steps (`lax.cond`).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from jaxclf import models
from jaxclf.models import tree_paths

SCOPES = ("global", "per_layer")
STEM, HEAD = "<stem>", "<head>"  # keep_dense entries the model's own metadata resolves


class PruneConfigError(ValueError):
    """An inconsistent `config.prune`; the message names the field."""


class PruneState(NamedTuple):
    """`count`: updates taken (int32); `masks`: bool per prunable param (None for the others)."""

    count: jax.Array
    masks: Any


def sparsity_at(step: jax.Array, *, initial: float, final: float, start: int, end: int) -> jax.Array:
    """Zhu & Gupta's target sparsity at `step`: `initial` before `start`, cubic to `final` at `end`, then flat."""
    progress = jnp.where(step >= end, 1.0, jnp.clip((step - start) / max(end - start, 1), 0.0, 1.0))
    return final + (initial - final) * (1.0 - progress) ** 3


def is_pruning_step(step: jax.Array, *, start: int, end: int, every: int) -> jax.Array:
    """Whether the masks are recomputed at `step`: every `every` steps from `start` to `end`, and at `end`."""
    in_range = (step >= start) & (step <= end)
    return in_range & (((step - start) % every == 0) | (step == end))


def _keep_largest(scores: jax.Array, sparsity: jax.Array) -> jax.Array:
    """bool like `scores`: False for exactly floor(sparsity * size) entries of lowest score (ties by position)."""
    flat = scores.reshape(-1)
    drop = jnp.floor(sparsity * flat.size).astype(jnp.int32)
    order = jnp.argsort(flat, stable=True)
    keep = jnp.zeros(flat.shape, bool).at[order].set(jnp.arange(flat.size) >= drop)
    return keep.reshape(scores.shape)


def _new_masks(scores: list[jax.Array], sparsity: jax.Array, scope: str) -> list[jax.Array]:
    if scope == "per_layer":
        return [_keep_largest(s, sparsity) for s in scores]
    joined = _keep_largest(jnp.concatenate([s.reshape(-1) for s in scores]), sparsity)
    splits = [int(s.size) for s in scores]
    pieces = jnp.split(joined, [sum(splits[:i + 1]) for i in range(len(splits) - 1)])
    return [piece.reshape(s.shape) for piece, s in zip(pieces, scores)]


def magnitude_pruning(prunable: Any, *, sparsity: float, initial_sparsity: float = 0.0, start: int, end: int,
                      every: int, scope: str = "global") -> optax.GradientTransformation:
    """An optax transformation (chain it last) pruning the params `prunable` (a bool tree like them) by magnitude.

    Its update keeps the incoming update where the mask is 1 and sends the weight to exactly 0 where it is 0;
    `scope` "global" ranks every prunable weight together, "per_layer" each param by itself.
    """
    if scope not in SCOPES:
        raise PruneConfigError(f"config.prune.scope={scope!r}: use 'global' or 'per_layer'")
    schedule = dict(initial=initial_sparsity, final=sparsity, start=start, end=end)

    def select(tree):
        return jax.tree.map(lambda p, x: x if p else None, prunable, tree)

    def init(params):
        return PruneState(jnp.zeros((), jnp.int32), jax.tree.map(lambda x: jnp.ones(x.shape, bool), select(params)))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("magnitude_pruning needs the params in update() to rank weights by magnitude")
        step = state.count + 1  # the step this update completes
        masks, treedef = jax.tree.flatten(state.masks)
        chosen_updates, chosen_params = jax.tree.leaves(select(updates)), jax.tree.leaves(select(params))

        def recompute(masks):
            scores = [jnp.where(m, jnp.abs(p + u), -1.0) for m, p, u in zip(masks, chosen_params, chosen_updates)]
            return _new_masks(scores, sparsity_at(step, **schedule), scope)

        when = is_pruning_step(step, start=start, end=end, every=every)
        masks = jax.lax.cond(when, recompute, lambda masks: masks, masks)
        masks_tree = jax.tree.unflatten(treedef, masks)

        def apply(mask, update, param):
            return update if mask is None else jnp.where(mask, update, -param)

        updates = jax.tree.map(apply, masks_tree, updates, params, is_leaf=lambda x: x is None)
        return updates, PruneState(state.count + 1, masks_tree)

    return optax.GradientTransformation(init, update)


def prunable_params(model: models.Classifier, keep_dense: tuple[str, ...]):
    """bool tree like the model's params: True for conv kernels and weight matrices (rank > 1) that are neither
    in `model.no_weight_decay()` (position embeddings, tokens) nor matched by `keep_dense`: regexes searched in
    the param path, with "<stem>" meaning the params of `model.layer_id` 0 and "<head>" `model.head_paths()`."""
    params = nnx.state(model, nnx.Param)
    patterns = [re.compile(p) for p in keep_dense if p not in (STEM, HEAD)]
    no_decay = model.no_weight_decay()

    def dense(name: str) -> bool:
        if HEAD in keep_dense and models.matches(name, model.head_paths()):
            return True
        if STEM in keep_dense:
            try:
                if model.layer_id(name) == 0:
                    return True
            except NotImplementedError:
                raise PruneConfigError(
                    f"config.prune.keep_dense names {STEM!r}, but {type(model).__name__} defines no layer_id() "
                    "to say which params are its stem: list regexes of its first layer's paths instead") from None
        return any(p.search(name) for p in patterns)

    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf.ndim > 1 and not models.matches(name := tree_paths.path_name(path), no_decay)
        and not dense(name), params)


def with_pruning(tx: optax.GradientTransformation, config: ml_collections.ConfigDict, model: models.Classifier,
                 total_steps: int) -> optax.GradientTransformation:
    """`tx` followed by `config.prune`'s magnitude pruning; `tx` itself when `config.prune.sparsity` is 0."""
    prune = config.prune
    if not prune.sparsity:
        return tx
    # An EMA of pruned weights is not sparse, and a LoRA base is frozen: neither would export what was pruned.
    if config.ema_decay > 0 or config.peft.method:
        raise PruneConfigError("config.prune.sparsity > 0 prunes the trained weights themselves: set "
                               "config.ema_decay=0 and config.peft.method='' with it")
    if not 0 <= prune.initial_sparsity <= prune.sparsity < 1:
        raise PruneConfigError(f"config.prune: need 0 <= initial_sparsity ({prune.initial_sparsity}) <= sparsity "
                               f"({prune.sparsity}) < 1")
    end = prune.end or total_steps
    if not 0 <= prune.start <= end or prune.every < 1:
        raise PruneConfigError(f"config.prune: need 0 <= start ({prune.start}) <= end ({end}) and every "
                               f"({prune.every}) >= 1")
    prunable = prunable_params(model, tuple(prune.keep_dense))
    if not any(jax.tree.leaves(prunable)):
        raise PruneConfigError(f"config.prune.keep_dense={tuple(prune.keep_dense)} leaves no param to prune")
    return optax.chain(tx, magnitude_pruning(prunable, sparsity=prune.sparsity,
                                             initial_sparsity=prune.initial_sparsity, start=prune.start, end=end,
                                             every=prune.every, scope=prune.scope))


def sparsity_of(params: Any, prunable: Any) -> float:
    """The fraction of zeros among the prunable params (host numbers, for reports and tests)."""
    chosen = [x for p, x in zip(jax.tree.leaves(prunable), jax.tree.leaves(params)) if p]
    return float(sum(int(jnp.sum(x == 0)) for x in chosen) / sum(x.size for x in chosen))
