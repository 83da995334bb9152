"""What the server knows of a model, whatever it was loaded from: a run's checkpoint or an exported artefact.

Both load as an `inference.LoadedModel`; `from_loaded` takes what the app, the batcher and the page
need from it: class names, the fixed input size, turning an upload's bytes into the model's uint8
input (the run's eval preprocessing through the project's one image reader, `ops.Decode`), the
logits of a batch, what /v1/model reports, and the explanation where the model's graph is there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from jaxclf import explain as explain_lib
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
    load_image: Callable[[str, bytes], np.ndarray]
    logits: Callable[[np.ndarray], np.ndarray]
    preprocessing: dict
    provenance: dict
    explain: Callable[[np.ndarray, str | None], dict] | None = None
    explain_method: str | None = None


def from_loaded(loaded: inference.LoadedModel, image_size: int | None = None) -> ServedModel:
    """Serve a run's checkpoint (`inference.load_trained`) or an exported artefact (`artefact.load_artefact`);
    `image_size` where the run's pp_eval leaves the size open."""
    size = loaded.input_size()
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
        load_image=loaded.load_image,
        logits=loaded.logits,
        preprocessing={"pp_eval": config.data.pp_eval, "mean": list(loaded.mean), "std": list(loaded.std),
                       "normalisation": "inside the model call: (image / 255 - mean) / std"},
        provenance={"format": loaded.format, **loaded.provenance, "model_init": config.model_init or None},
        explain=(lambda image, class_name=None: explain_lib.explain(loaded, image, class_name)) if method else None,
        explain_method=method,
    )
