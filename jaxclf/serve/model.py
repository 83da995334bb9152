"""The one interface the server has to a model, whatever it was loaded from: a run's workdir (or an exported artefact).

Everything the app, the batcher and the page need is here: class names, the fixed input size,
turning an upload's bytes into the model's uint8 input (through the run's eval preprocessing and
the project's one image reader, `ops.Decode`), the logits of a batch, and what /v1/model reports.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import numpy as np

from jaxclf import explain as explain_lib, inference


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """A model ready to serve.

    `load_image(name, data)`: encoded image bytes -> uint8[h, w, 3] after the eval preprocessing
    (raises ops.BadImage naming `name`); `logits(images)`: uint8[B, H, W, 3] -> float32[B, C];
    `explain(image, class_name)`: jaxclf.explain's result for one preprocessed image, None where the
    model offers no hook (an exported artefact, a model without features/attention).
    """

    name: str
    class_names: tuple[str, ...]
    input_size: tuple[int, int]
    step: int | None
    load_image: Callable[[str, bytes], np.ndarray]
    logits: Callable[[np.ndarray], np.ndarray]
    preprocessing: dict
    provenance: dict
    explain: Callable[[np.ndarray, str | None], dict] | None = None
    explain_method: str | None = None


def from_trained(trained: inference.TrainedModel, image_size: int | None = None) -> ServedModel:
    """Serve a run loaded by `inference.load_trained`; `image_size` where its pp_eval leaves the size open."""
    size = trained.input_size()
    if size is None:
        if not image_size:
            raise inference.WorkdirError(
                f"data.pp_eval={trained.config.data.pp_eval!r} in {trained.workdir}/config.json does not produce one "
                "image size, and batches need one: pass --image_size (images of another size are then refused)"
            )
        size = (image_size, image_size)
    elif image_size and (image_size, image_size) != size:
        raise inference.WorkdirError(
            f"--image_size {image_size}: the run's data.pp_eval={trained.config.data.pp_eval!r} makes every image "
            f"{size[0]}x{size[1]}; leave --image_size out"
        )
    method = explain_lib.explanation_method(trained.model)
    config = trained.config
    return ServedModel(
        name=config.model_name,
        class_names=trained.class_names,
        input_size=size,
        step=trained.step,
        load_image=trained.load_image,
        logits=trained.logits,
        preprocessing={"pp_eval": config.data.pp_eval, "mean": list(trained.mean), "std": list(trained.std),
                       "normalisation": "inside the model call: (image / 255 - mean) / std"},
        provenance={"source": "workdir", "workdir": os.path.abspath(trained.workdir), "checkpoint_step": trained.step,
                    "weights": trained.weights, "model_init": config.model_init or None},
        explain=(lambda image, class_name=None: explain_lib.explain(trained, image, class_name)) if method else None,
        explain_method=method,
    )
