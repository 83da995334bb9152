"""Names for the leaves of a state tree ('layer1/0/conv1/kernel'), shared by the optimizer,
checkpoints and weight loading, and the one way jaxclf reports two trees that do not fit."""

from __future__ import annotations

import jax


def path_name(path) -> str:
    """'layer1/0/conv1/kernel' for a jax key path into an nnx.State (the variable's `.value` dropped)."""
    parts = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", None)))
        if name is not None and name != "value":
            parts.append(str(name))
    return "/".join(parts)


def flatten(tree) -> dict:
    """{'layer1/0/conv1/kernel': leaf, ...} for every array-like leaf of `tree`."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {path_name(path): leaf for path, leaf in leaves if hasattr(leaf, "shape")}


def shapes(tree) -> dict[str, tuple[int, ...]]:
    """{'layer1/0/conv1/kernel': (3, 3, 64, 64), ...}; a typed PRNG key (a dropout layer's RNG stream)
    has its key data's shape, as a checkpoint stores it."""
    return {name: _stored_shape(leaf) for name, leaf in flatten(tree).items()}


def _stored_shape(leaf) -> tuple[int, ...]:
    if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
        return tuple(jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)).shape)
    return tuple(leaf.shape)


def mismatches(source: dict[str, tuple], target: dict[str, tuple], source_name: str, target_name: str) -> list[str]:
    """One line per path missing from `source`, missing from `target`, or shaped differently."""
    problems = [f"missing in {source_name}: {k} {target[k]}" for k in target if k not in source]
    problems += [f"not in {target_name}: {k} {source[k]}" for k in source if k not in target]
    problems += [f"shape of {k}: {source_name} {source[k]}, {target_name} {target[k]}"
                 for k in target if k in source and source[k] != target[k]]
    return problems


def format_problems(problems: list[str], limit: int = 40) -> str:
    """The problem lines, indented, cut after `limit` with a count of the rest."""
    shown = "\n  ".join(problems[:limit])
    return "  " + shown + (f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else "")
