"""Show where a trained model looked: `python -m jaxclf.explain --workdir DIR IMAGE [--class NAME] --out PNG`.

- Convnets (every `Classifier` declares `forward_features`/`forward_head`): Grad-CAM (Selvaraju et al., 2017), for
  the predicted class or --class. Where they take a stage (`forward_features(images, stages)`,
  `forward_head(features, from_stage)`, as jaxclf's ResNets), on the deepest of the 4 stages whose
  map is at least 4x4 (the last stage's is 1x1 at 32 px and would be flat); else on the final map.
- Models whose attention layers sow their weights (`sow_weights`, ViTs): attention rollout (Abnar
  & Zuidema, 2020): each block's head-averaged attention, mixed half and half with the identity
  for the residual path, row-normalised and multiplied through the blocks; the map is the class
  token's row (or, with average pooling, the mean of the patch tokens' rows) over the patches,
  register tokens left out. It does not depend on the class.
The PNG shows the preprocessed image the model saw and the map laid over it.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from flax import nnx

from jaxclf import models
from jaxclf.data.normalize import normalize_images
from jaxclf.runs import inference


# Grad-CAM's map must have at least this many pixels a side to show where the evidence is.
MIN_CAM_SIDE = 4


def grad_cam(model: nnx.Module, images: jax.Array, class_index: int, stage: int | None = None) -> np.ndarray:
    """Grad-CAM of `class_index` for normalised `images` float32[1, H, W, 3] on the map after `stage`
    (None: the final map): float32[h, w] >= 0.

    Each feature channel is weighted by the mean gradient of the class logit over the map; the
    weighted sum is clipped at 0.
    """
    return np.asarray(_grad_cam(model, images, class_index, stage))


def cam_stage(model: nnx.Module, image_shape: tuple[int, ...]) -> int | None:
    """The deepest stage (1..4) whose feature map is at least MIN_CAM_SIDE pixels a side (else 1);
    None for a model whose `forward_features` takes no stage."""
    if "stages" not in inspect.signature(model.forward_features).parameters:
        return None
    for stage in (4, 3, 2, 1):
        shape = nnx.eval_shape(lambda m: m.forward_features(jnp.zeros(image_shape), stage), model).shape
        if min(shape[1:3]) >= MIN_CAM_SIDE:
            return stage
    return 1


@nnx.jit(static_argnums=3)
def _grad_cam(model: nnx.Module, images: jax.Array, class_index: jax.Array, stage: int | None) -> jax.Array:
    staged = () if stage is None else (stage,)
    features = model.forward_features(images, *staged)
    gradients = jax.grad(lambda f: model.forward_head(f, *staged)[0, class_index])(features)
    weights = gradients.astype(jnp.float32).mean(axis=(1, 2), keepdims=True)
    return jax.nn.relu((weights * features.astype(jnp.float32)).sum(axis=-1))[0]


def has_attention_weights(model: nnx.Module) -> bool:
    """Whether `model` has attention layers that can sow their weights (`sow_weights`)."""
    return any(hasattr(module, "sow_weights") for _, module in nnx.iter_modules(model))


def attention_maps(model: nnx.Module, images: jax.Array) -> jax.Array:
    """Every attention layer's weights for normalised `images`, in call order: float32[layers, B, heads, N, N]."""
    capturing = nnx.clone(model)
    for _, module in nnx.iter_modules(capturing):
        if hasattr(module, "sow_weights"):
            module.sow_weights = True
    return _attention_maps(capturing, images)


@nnx.jit
def _attention_maps(model: nnx.Module, images: jax.Array) -> jax.Array:
    _, intermediates = nnx.capture(model, nnx.Intermediate)(images)
    # Paths hold the block index (an int for nnx.List): sort by path so block 10 follows block 9.
    sown = sorted(nnx.to_flat_state(intermediates), key=lambda item: tuple(map(_sort_key, item[0])))
    return jnp.stack([_first_sown(variable.get_value()) for _, variable in sown])


def _first_sown(value):
    """`sow` keeps a tuple of the values of every call; an attention layer is called once per forward."""
    return value[0] if isinstance(value, tuple) else value


def _sort_key(part) -> tuple:
    return (0, part, "") if isinstance(part, int) else (1, 0, str(part))


def attention_rollout(model: nnx.Module, images: jax.Array) -> np.ndarray:
    """Attention rollout for normalised `images` float32[1, H, W, 3]: float32[gh, gw] >= 0 on the patch grid."""
    maps = attention_maps(model, images)[:, 0].mean(axis=1)  # [depth, N, N], heads averaged
    return np.asarray(_rollout(maps, model.num_prefix_tokens, model.global_pool == "token"))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _rollout(maps: jax.Array, prefix: int, class_token_row: bool) -> jax.Array:
    tokens = maps.shape[-1]
    rollout = jnp.eye(tokens)
    for attention in maps:
        mixed = 0.5 * attention + 0.5 * jnp.eye(tokens)
        rollout = (mixed / mixed.sum(axis=-1, keepdims=True)) @ rollout
    relevance = rollout[0, prefix:] if class_token_row else rollout[prefix:, prefix:].mean(axis=0)
    side = int(round(np.sqrt(tokens - prefix)))
    return relevance.reshape(side, side)


def explanation_method(model: nnx.Module) -> str | None:
    """"attention rollout" or "Grad-CAM", the method `explain` uses for `model`; None if it has neither hook."""
    if has_attention_weights(model):
        return "attention rollout"
    if isinstance(model, models.Classifier) and type(model).forward_features is not models.Classifier.forward_features:
        return "Grad-CAM"
    return None


def explain(trained: inference.TrainedModel, image: np.ndarray, class_name: str | None = None) -> dict:
    """Explain the model's output on one preprocessed `image` uint8[H, W, 3].

    Returns {"heatmap": float32[H, W] in [0, 1] (upsampled), "method", "where" (the map's layer and grid), "class", "probability",
    "predicted", "predicted_probability"}.
    """
    probabilities = np.asarray(jax.nn.softmax(trained.logits(image[None])[0]))
    predicted = int(probabilities.argmax())
    if class_name is None:
        class_index = predicted
    elif class_name in trained.class_names:
        class_index = trained.class_names.index(class_name)
    else:
        raise inference.WorkdirError(f"--class {class_name!r} is not a class of this run; classes: "
                                     f"{', '.join(trained.class_names[:20])}{', ...' if len(trained.class_names) > 20 else ''}")
    normalised = normalize_images(jnp.asarray(image[None]), trained.mean, trained.std)
    model = trained.model
    method = explanation_method(model)
    if method == "attention rollout":
        coarse = attention_rollout(model, normalised)
        where = f"{coarse.shape[0]}x{coarse.shape[1]} patches"
    elif method == "Grad-CAM":
        stage = cam_stage(model, normalised.shape)
        coarse = grad_cam(model, normalised, class_index, stage)
        where = f"{'final' if stage is None else f'stage {stage}'} {coarse.shape[0]}x{coarse.shape[1]} map"
    else:
        raise inference.WorkdirError(
            f"model {trained.config.model_name!r} offers no hook to explain: it needs forward_features and "
            "forward_head (Grad-CAM) or attention layers with sow_weights (attention rollout)"
        )
    heatmap = np.asarray(jax.image.resize(jnp.asarray(coarse, jnp.float32), image.shape[:2], "bilinear"))
    heatmap = np.clip(heatmap, 0.0, None)
    heatmap = heatmap / heatmap.max() if heatmap.max() > 0 else heatmap
    return {
        "heatmap": heatmap,
        "method": method,
        "where": where,
        "class": trained.class_names[class_index],
        "probability": float(probabilities[class_index]),
        "predicted": trained.class_names[predicted],
        "predicted_probability": float(probabilities[predicted]),
    }


def blend_heatmap(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """uint8[H, W, 3]: `heatmap` float32[H, W] in [0, 1] in the jet colours over `image`, as `save_overlay` draws it."""
    colours = colormaps["jet"](heatmap)[..., :3]
    return np.round((1 - alpha) * image + alpha * 255 * colours).astype(np.uint8)


def save_overlay(image: np.ndarray, explanation: dict, path: str, source: str = "") -> str:
    """A PNG of the image and of the heat map over it, titled with the method, class and probability."""
    fig = Figure(figsize=(9, 4.8))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    left.imshow(image)
    left.set_title(f"input{': ' + os.path.basename(source) if source else ''}\npredicted {explanation['predicted']} "
                   f"({explanation['predicted_probability']:.1%})", fontsize=10)
    right.imshow(image)
    overlay = right.imshow(explanation["heatmap"], cmap="jet", alpha=0.45, vmin=0, vmax=1)
    target = "any class" if explanation["method"] == "attention rollout" else (
        f"class {explanation['class']} ({explanation['probability']:.1%})")
    right.set_title(f"{explanation['method']} ({explanation['where']}): {target}", fontsize=10)
    fig.colorbar(overlay, ax=right, fraction=0.046, pad=0.04)
    for ax in (left, right):
        ax.axis("off")
    FigureCanvasAgg(fig)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; exit status 0, or 2 for a mistake in the arguments, workdir or data (message on stderr)."""
    return inference.run_tool(_run, argv)


def _run(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxclf.explain", description=__doc__.splitlines()[0])
    inference.add_run_arguments(parser)
    parser.add_argument("image", help="an image file")
    parser.add_argument("--class", dest="class_name", help="class to explain (Grad-CAM); default: the predicted one")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    trained = inference.load_from_args(args)
    image = trained.load_image(args.image)
    explanation = explain(trained, image, args.class_name)
    save_overlay(image, explanation, args.out, source=args.image)
    print(f"{explanation['method']} ({explanation['where']}), predicted {explanation['predicted']} ({explanation['predicted_probability']:.1%}); "
          f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
