"""The source model of a weights file, run in its own library (torch, timm, transformers), to check
a conversion: `python -m jaxclf.convert ... --check`. Needs the test extra's PyTorch stack."""

from __future__ import annotations

import numpy as np

from jaxclf.weights import files


# jaxclf (timm) model names whose torchvision counterpart is named otherwise.
_TORCHVISION_NAMES = {"mobilenetv3_large_100": "mobilenet_v3_large", "mobilenetv3_small_100": "mobilenet_v3_small"}


def reference_logits(path: str, source_format: str, model_name: str, model_options: dict, num_classes: int,
                     images: np.ndarray) -> np.ndarray:
    """Logits of the original model on `images` (normalised float32 [B, H, W, 3])."""
    import torch

    model = _build(path, source_format, model_name, model_options, num_classes).eval()
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))))
    return (out.logits if hasattr(out, "logits") else out).numpy()


def _build(path, source_format, model_name, model_options, num_classes):
    import torch

    if source_format.startswith("hf_"):
        import transformers

        return transformers.AutoModelForImageClassification.from_pretrained(path)
    import timm

    if source_format.startswith("torchvision"):
        import torchvision

        name = _TORCHVISION_NAMES.get(model_name, model_name)
        model = getattr(torchvision.models, name)(num_classes=num_classes)
    else:
        kwargs = {"img_size": model_options["img_size"]} if "img_size" in model_options else {}
        model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)
    if source_format.endswith("_npz"):
        model.load_pretrained(path)  # timm's own npz loader is the reference for npz files
    else:
        state = {k: torch.from_numpy(v) for k, v in files.read_tensors(path).items()}
        model.load_state_dict(state)
    return model
