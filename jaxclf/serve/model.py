"""What the server knows of a model, whatever it was loaded from: a run's checkpoint or an exported artefact.

Both load as an `inference.LoadedModel`; `from_loaded` takes what the app, the batcher and the page
need from it: class names, the fixed input size, turning an upload's bytes into the model's uint8
input (the run's eval preprocessing through the project's one image reader, `ops.Decode`), the
logits of a batch, what /v1/model reports, and the explanation where the model's graph is there.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable

import numpy as np

from jaxclf import explain as explain_lib
from jaxclf.data.ops.decode import check_max_pixels
from jaxclf.runs import inference


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """A model ready to serve.

    `load_image(name, data)`: encoded image bytes -> uint8[h, w, 3] after the eval preprocessing
    (raises ops.BadImage naming `name`); `logits(images)`: uint8[B, H, W, 3] -> float32[B, C];
    `explain(image, class_name)`: jaxclf.explain's result for one preprocessed image, None where the
    model offers no hook (an exported artefact, a model without features or attention).
    """

    name: str
    class_names: tuple[str, ...]
    input_size: tuple[int, int]
    step: int | None
    max_image_pixels: int
    load_image: Callable[[str, bytes], np.ndarray]
    logits: Callable[[np.ndarray], np.ndarray]
    preprocessing: dict
    provenance: dict
    explain: Callable[[np.ndarray, str | None], dict] | None = None
    explain_method: str | None = None


def client_provenance(fmt: str, provenance: dict, model_init: str) -> dict:
    """What /v1/model tells any client of where the weights come from: the run's and artefact's names (their
    base names) and checkpoint step, never a path on the server's disk."""
    told = {"format": fmt, "run": os.path.basename(os.path.normpath(provenance["workdir"])) if provenance.get("workdir") else None}
    if "artefact" in provenance:
        told["artefact"] = os.path.basename(provenance["artefact"])
    told.update({key: provenance.get(key) for key in ("checkpoint_step", "weights", "quantization") if key in provenance})
    # A hub name (timm/resnet18.tv_in1k) is public; a file or run on this machine is told by its name only.
    told["model_init"] = os.path.basename(os.path.normpath(model_init)) if model_init and (
        os.path.isabs(model_init) or os.path.exists(model_init)) else (model_init or None)
    return told


def from_loaded(loaded: inference.LoadedModel, image_size: int | None = None,
                max_image_pixels: int | None = None) -> ServedModel:
    """Serve a run's checkpoint (`inference.load_trained`) or an exported artefact (`artefact.load_artefact`);
    `image_size` where the run's pp_eval leaves the size open; uploads over `max_image_pixels` (default: the
    run's config.data.max_image_pixels) are refused from their header."""
    size = loaded.input_size()
    limit = max_image_pixels or loaded.config.data.max_image_pixels
    check_max_pixels(limit)
    where = f"data.pp_eval={loaded.config.data.pp_eval!r} in {loaded._config_path}"
    if size is None:
        if not image_size:
            raise inference.WorkdirError(
                f"{where} does not produce one image size, and batches need one: pass --image_size "
                "(images of another size are then refused)"
            )
        size = (image_size, image_size)
    elif image_size and (image_size, image_size) != size:
        raise inference.WorkdirError(f"--image_size {image_size}: {where} makes every image {size[0]}x{size[1]}; "
                                     "leave --image_size out")
    # Explanations need the model's graph (features, attention): a checkpoint has it, an artefact does not.
    model = getattr(loaded, "model", None)
    method = explain_lib.explanation_method(model) if model is not None else None
    config = loaded.config
    return ServedModel(
        name=loaded.model_name,
        class_names=loaded.class_names,
        input_size=size,
        step=loaded.step,
        max_image_pixels=limit,
        load_image=functools.partial(loaded.load_image, max_pixels=limit),
        logits=loaded.logits,
        preprocessing={"pp_eval": config.data.pp_eval, "mean": list(loaded.mean), "std": list(loaded.std),
                       "normalisation": "inside the model call: (image / 255 - mean) / std"},
        provenance=client_provenance(loaded.format, loaded.provenance, config.model_init),
        explain=(lambda image, class_name=None: explain_lib.explain(loaded, image, class_name)) if method else None,
        explain_method=method,
    )
