"""Fit converted weights to the model being fine-tuned: a new head, a new resolution, strict keys.

- a head (the model's `head_paths()`) whose class count differs is reset to zeros (as big_vision
  does), and the caller told so; weights without a head (a backbone: DINOv2, SigLIP, CLIP towers) get
  a new one of zeros;
- a position embedding for another grid is resampled (bilinear by default, or bicubic);
- every other missing, unexpected or mis-shaped key is an error listing all of them, unless a
  `dont_load` regex names it (those keep the model's fresh initialisation).
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np

from jaxclf import models
from jaxclf.models import tree_paths
from jaxclf.weights.files import WeightsError

POS_EMBED = "pos_embed"


def resample_pos_embed(pos: np.ndarray, num_prefix_tokens: int, new_tokens: int, method: str = "bilinear") -> np.ndarray:
    """[1, prefix + g*g, D] -> [1, prefix + G*G, D], resizing the square grid of patch positions
    (half-pixel centres, as in PyTorch's align_corners=False). A smaller grid is antialiased, as timm's
    `resample_abs_pos_embed` does (DINOv2's 518 px grid to 224 px equals timm's); a larger one is plain
    interpolation either way."""
    if method not in ("bilinear", "bicubic"):
        raise WeightsError(f"position embedding interpolation {method!r}: use 'bilinear' or 'bicubic'")
    prefix, grid = pos[:, :num_prefix_tokens], pos[:, num_prefix_tokens:]
    old, new = math.isqrt(grid.shape[1]), math.isqrt(new_tokens - num_prefix_tokens)
    if old * old != grid.shape[1] or new * new != new_tokens - num_prefix_tokens:
        raise WeightsError(f"pos_embed: cannot resample {pos.shape[1]} positions to {new_tokens} (not square grids)")
    grid = grid.reshape(1, old, old, -1)
    resized = jax.image.resize(grid, (1, new, new, grid.shape[-1]), "linear" if method == "bilinear" else "cubic",
                               antialias=True)
    return np.concatenate([prefix, np.asarray(resized).reshape(1, new * new, -1)], axis=1)


def fit(
    params: dict[str, np.ndarray],
    target: dict[str, tuple[int, ...]],
    *,
    head_paths: tuple[str, ...] = (),
    pos_embed_prefix_tokens: int = 0,
    dont_load: tuple[str, ...] = (),
    pos_interpolation: str = "bilinear",
) -> tuple[dict[str, np.ndarray], list[str]]:
    """`params` reshaped for a model whose arrays have the shapes `target`; returns (params, notes).

    `head_paths` and `pos_embed_prefix_tokens` are the model's (`models.Classifier`)."""
    skip = [re.compile(p) for p in dont_load]
    params = {k: v for k, v in params.items() if not any(p.search(k) for p in skip)}
    target = {k: v for k, v in target.items() if not any(p.search(k) for p in skip)}
    notes = [f"not loaded (dont_load): {', '.join(dont_load)}"] if dont_load else []
    reset = [k for k in params if models.matches(k, head_paths) and k in target and params[k].shape != target[k]]
    for name in reset:
        params[name] = np.zeros(target[name], np.float32)
    if reset:
        notes.append(f"head reset to zeros for {target[reset[0]][-1]} classes: {', '.join(sorted(reset))}")
    head = sorted(k for k in target if models.matches(k, head_paths))
    if head and not any(k in params for k in head):
        params.update({k: np.zeros(target[k], np.float32) for k in head})
        notes.append(f"the weights have no classifier: a new head of zeros for {target[head[0]][-1]} classes: "
                     f"{', '.join(head)}")
    if POS_EMBED in params and POS_EMBED in target and params[POS_EMBED].shape != target[POS_EMBED]:
        old = params[POS_EMBED].shape
        params[POS_EMBED] = resample_pos_embed(params[POS_EMBED], pos_embed_prefix_tokens, target[POS_EMBED][1],
                                               pos_interpolation)
        notes.append(f"pos_embed resampled ({pos_interpolation}) from {old} to {target[POS_EMBED]}")
    problems = tree_paths.mismatches({k: v.shape for k, v in params.items()}, target, "the weights", "the model")
    if problems:
        raise WeightsError(
            "the weights do not fit the model:\n" + tree_paths.format_problems(problems)
            + "\nPick the matching config.model_name, or list keys to skip in config.model_init_dont_load."
        )
    return params, notes
