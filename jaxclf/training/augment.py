"""Batch-level augmentation that runs on the device inside the jitted train step.

Per-example ops run in data workers (jaxclf/data/ops.py); mixing needs two examples at once, so
it happens here, on the normalised float batch, with soft targets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mixup_cutmix(
    key: jax.Array,
    images: jax.Array,
    targets: jax.Array,
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
    mix_prob: float = 1.0,
    switch_prob: float = 0.5,
) -> tuple[jax.Array, jax.Array]:
    """Mix each example with its mirror in the batch (row i with row B-1-i), timm's "batch" mode.

    images: float[B, H, W, C]; targets: float[B, num_classes] (one-hot or smoothed). With
    probability `mix_prob` the batch is mixed: by cutmix with probability `switch_prob` when both
    alphas are > 0 (else whichever is > 0), the mixing weight lam ~ Beta(alpha, alpha). Cutmix
    pastes a box of area (1 - lam) H W and corrects lam to the box actually pasted. Works for any
    batch size: with an odd one the middle example mixes with itself. Returns (images, targets).
    """
    if not mixup_alpha and not cutmix_alpha:
        return images, targets
    k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(key, 5)
    batch, height, width, _ = images.shape
    mirrored_images, mirrored_targets = images[::-1], targets[::-1]

    if cutmix_alpha and mixup_alpha:
        use_cutmix = jax.random.uniform(k_switch) < switch_prob
    else:
        use_cutmix = jnp.asarray(bool(cutmix_alpha))
    lam_mixup = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha else jnp.float32(1.0)
    lam_cutmix = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha else jnp.float32(1.0)

    box = cutmix_box(k_box, height, width, lam_cutmix)  # bool[H, W], True where the mirror is pasted
    lam_box = 1.0 - jnp.mean(box.astype(jnp.float32))
    cut_images = jnp.where(box[None, :, :, None], mirrored_images, images)
    mixed_images = lam_mixup * images + (1.0 - lam_mixup) * mirrored_images

    lam = jnp.where(use_cutmix, lam_box, lam_mixup)
    new_images = jnp.where(use_cutmix, cut_images, mixed_images)
    apply = jax.random.uniform(k_apply) < mix_prob
    lam = jnp.where(apply, lam, 1.0)
    new_images = jnp.where(apply, new_images, images)
    return new_images, lam * targets + (1.0 - lam) * mirrored_targets


def cutmix_box(key: jax.Array, height: int, width: int, lam: jax.Array) -> jax.Array:
    """bool[H, W] box of area about (1 - lam) H W at a uniform random centre, clipped to the image."""
    k_y, k_x = jax.random.split(key)
    cut = jnp.sqrt(1.0 - lam)
    cut_h, cut_w = jnp.round(height * cut), jnp.round(width * cut)
    cy = jax.random.randint(k_y, (), 0, height)
    cx = jax.random.randint(k_x, (), 0, width)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    return (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
