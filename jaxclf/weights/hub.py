"""Hub names and the config files that come with downloaded weights.

`timm/vit_base_patch16_224.augreg2_in21k_ft_in1k` or `google/vit-base-patch16-224` download
through huggingface_hub when it is installed and the network allows; offline, the error says
which files to fetch and where to point jaxclf instead. A folder's `config.json` (timm's
`pretrained_cfg`, or transformers' model config) and `preprocessor_config.json` supply the model
name, its options and the preprocessing.
"""

from __future__ import annotations

import json
import os
import re

from jaxclf.weights.files import WeightsError

_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")
_FILES = ("model.safetensors", "config.json", "preprocessor_config.json")
_VIT_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large"}
_RESNET_DEPTHS = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}
_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}


def resolve(source: str) -> str:
    """A local path for `source`: itself when it exists, else a hub download."""
    if os.path.exists(source):
        return source
    if not _HUB_NAME.match(source):
        raise WeightsError(f"weights {source!r}: no such file or folder (nor a hub name like org/model)")
    url = f"https://huggingface.co/{source}/resolve/main"
    manual = (f"if it is a hub name, download {url}/model.safetensors and {url}/config.json into one "
              "folder and pass that folder instead; if it is meant to be a local folder, create it with "
              f"`python -m jaxclf.convert WEIGHTS_FILE --model NAME --out {source}`")
    try:
        import huggingface_hub
    except ImportError:
        raise WeightsError(f"{source} looks like a hub name but huggingface_hub is not installed: {manual}") from None
    folder = None
    for name in _FILES:
        try:
            path = huggingface_hub.hf_hub_download(source, name)
        except Exception as e:  # offline, missing repo or file: the hub raises many kinds
            if name == "model.safetensors":
                raise WeightsError(f"{source} is not a file or folder here, and downloading it from the hub "
                                   f"failed ({type(e).__name__}); {manual}") from None
            continue
        folder = os.path.dirname(path)
    return folder


def read_sidecar_config(path: str) -> dict:
    """{'config': ..., 'preprocessor': ...} from the JSON files beside the weights of a folder."""
    if not os.path.isdir(path):
        return {}
    out = {}
    for key, name in (("config", "config.json"), ("preprocessor", "preprocessor_config.json")):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file) as f:
                out[key] = json.load(f)
    return out


def model_name_from_config(sidecar: dict) -> str:
    """The jaxclf model name a timm or transformers config describes ('' when it does not)."""
    config = sidecar.get("config", {})
    if "architecture" in config:  # timm
        return config["architecture"]
    if config.get("model_type") == "vit" and config.get("hidden_size") in _VIT_SIZES:
        size = 384 if config.get("image_size", 224) >= 384 else 224
        return f"vit_{_VIT_SIZES[config['hidden_size']]}_patch{config.get('patch_size', 16)}_{size}"
    if config.get("model_type") == "resnet":
        if config.get("downsample_in_bottleneck"):
            raise WeightsError("this Hugging Face ResNet strides in the first 1x1 conv (ResNet v1, "
                               "downsample_in_bottleneck=true); jaxclf's ResNets are v1.5 (stride in the 3x3)")
        depths = tuple(config.get("depths", ()))
        if config.get("layer_type") == "bottleneck" and depths == (3, 4, 6, 3):
            return "resnet50"
        return f"resnet{_RESNET_DEPTHS[depths]}" if depths in _RESNET_DEPTHS else ""
    return ""


def model_options_from_config(sidecar: dict) -> dict:
    """Model options a transformers ViT config implies (its LayerNorm epsilon)."""
    config = sidecar.get("config", {})
    return {"norm_eps": config["layer_norm_eps"]} if config.get("model_type") == "vit" else {}


def preprocessing_from_config(sidecar: dict) -> dict:
    """mean/std/interpolation/crop_pct from timm's pretrained_cfg or a transformers preprocessor config."""
    cfg = sidecar.get("config", {}).get("pretrained_cfg")
    if cfg:
        keys = {"mean": "mean", "std": "std", "interpolation": "interpolation", "crop_pct": "crop_pct"}
        out = {ours: cfg[theirs] for ours, theirs in keys.items() if theirs in cfg}
        if "input_size" in cfg:
            out["input_size"] = cfg["input_size"][-1]
        return out
    pre = sidecar.get("preprocessor")
    if not pre:
        return {}
    out = {}
    if "image_mean" in pre:
        out["mean"], out["std"] = tuple(pre["image_mean"]), tuple(pre["image_std"])
    if pre.get("resample") in _PIL_RESAMPLE:
        out["interpolation"] = _PIL_RESAMPLE[pre["resample"]]
    if "crop_pct" in pre:
        out["crop_pct"] = pre["crop_pct"]
    return out
