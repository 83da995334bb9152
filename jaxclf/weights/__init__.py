"""Pretrained weights: read any supported file, convert it to jaxclf params, fit them to a model.

    model, info = jaxclf.load_pretrained("converted/vit_b16", num_classes=37)

Sources (detected from the names inside the file): torchvision / timm ResNets, timm ViTs, Hugging
Face `ResNetForImageClassification` / `ViTForImageClassification` folders, vit_jax / big_vision ViT
`.npz`, BiT ResNetV2 (timm or the original `.npz`), and the transformers image towers `Dinov2Model`,
`SiglipVisionModel` and `CLIPVisionModel` (timm's DINOv2, SigLIP, CLIP and EVA-02 files are timm ViTs). `python -m jaxclf.convert` writes the result
as a folder (`params.npz` + `pretrained.json`) that `config.model_init` points to.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from jaxclf import models
from jaxclf.tracking import progress
from jaxclf.models import efficientnet as efficientnet_models, tree_paths
from jaxclf.weights import bit, cache, convnext, efficientnet, files, hf_towers, hub, resnet, surgery, vit, workdir
from jaxclf.weights.files import WeightsError

INFO_FILE = "pretrained.json"
PARAMS_FILE = "params.npz"

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
INCEPTION = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
OPENAI_CLIP = {"mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711)}


@dataclasses.dataclass(frozen=True)
class SourceFormat:
    """One kind of weights file: how to recognise it, convert it, and how its images were preprocessed."""

    name: str
    detect: Callable[[dict], bool]
    convert: Callable[[dict], dict]
    preprocessing: dict
    model_options: dict = dataclasses.field(default_factory=dict)  # what the file's model needs beyond its name


FORMATS = (
    SourceFormat("torchvision", resnet.is_torchvision, resnet.from_torchvision,
                 {**IMAGENET, "interpolation": "bilinear", "crop_pct": 0.875}),
    SourceFormat("hf_resnet", resnet.is_hf, resnet.from_hf, {**IMAGENET, "interpolation": "bilinear", "crop_pct": 0.875}),
    SourceFormat("timm_vit", vit.is_timm, vit.from_timm, {**INCEPTION, "interpolation": "bicubic", "crop_pct": 0.9}),
    SourceFormat("hf_vit", vit.is_hf, vit.from_hf, {**INCEPTION, "interpolation": "bilinear", "crop_pct": 1.0}),
    SourceFormat("vit_npz", vit.is_npz, vit.from_npz, {**INCEPTION, "interpolation": "bilinear", "crop_pct": 1.0}),
    SourceFormat("timm_bit", bit.is_timm, bit.from_timm, {**INCEPTION, "interpolation": "bilinear", "crop_pct": 1.0}),
    SourceFormat("bit_npz", bit.is_npz, bit.from_npz, {**INCEPTION, "interpolation": "bilinear", "crop_pct": 1.0}),
    SourceFormat("timm_efficientnet", efficientnet.is_timm, efficientnet.from_timm,
                 {**IMAGENET, "interpolation": "bicubic", "crop_pct": 0.875}),
    SourceFormat("torchvision_efficientnet", efficientnet.is_torchvision_efficientnet,
                 efficientnet.from_torchvision_efficientnet, {**IMAGENET, "interpolation": "bicubic", "crop_pct": 0.875}),
    # torchvision's MobileNetV3 BatchNorm has eps 1e-3 (timm's 1e-5).
    SourceFormat("torchvision_mobilenetv3", efficientnet.is_torchvision_mobilenetv3,
                 efficientnet.from_torchvision_mobilenetv3, {**IMAGENET, "interpolation": "bilinear", "crop_pct": 0.875},
                 model_options={"bn_eps": 1e-3}),
    SourceFormat("timm_convnext", convnext.is_timm, convnext.from_timm,
                 {**IMAGENET, "interpolation": "bicubic", "crop_pct": 0.875}),
    SourceFormat("torchvision_convnext", convnext.is_torchvision, convnext.from_torchvision,
                 {**IMAGENET, "interpolation": "bilinear", "crop_pct": 0.875}),
    SourceFormat("hf_dinov2", hf_towers.is_dinov2, hf_towers.from_dinov2,
                 {**IMAGENET, "interpolation": "bicubic", "crop_pct": 0.875}),
    SourceFormat("hf_siglip", hf_towers.is_siglip, hf_towers.from_siglip,
                 {**INCEPTION, "interpolation": "bicubic", "crop_pct": 1.0}),
    SourceFormat("hf_clip", hf_towers.is_clip, hf_towers.from_clip,
                 {**OPENAI_CLIP, "interpolation": "bicubic", "crop_pct": 1.0}),
)


@dataclasses.dataclass
class Pretrained:
    """What travels with converted weights: the model they fit and the preprocessing they expect."""

    model_name: str
    model_options: dict
    num_classes: int
    source: str
    source_format: str
    preprocessing: dict  # input_size, mean, std, interpolation, crop_pct

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def detect_format(tensors: dict, path: str, name: str = "") -> SourceFormat:
    """The format `name`, or the one whose names `tensors` carries."""
    if name:
        by_name = {f.name: f for f in FORMATS}
        if name not in by_name:
            raise WeightsError(f"--format {name!r} is unknown; known: {', '.join(by_name)}")
        return by_name[name]
    for fmt in FORMATS:
        if fmt.detect(tensors):
            return fmt
    raise WeightsError(
        f"{path}: cannot tell which model wrote it (first keys: {sorted(tensors)[:6]}); "
        f"give the format with --format ({', '.join(f.name for f in FORMATS)})"
    )


def convert(source: str, model_name: str = "", format_name: str = "") -> tuple[dict[str, np.ndarray], Pretrained]:
    """Read `source` (a file, a Hugging Face / timm folder or a hub name: `hub.resolve`) into (params, info)."""
    path = hub.resolve(source)
    tensors = files.read_tensors(path)
    fmt = detect_format(tensors, path, format_name)
    params = fmt.convert(tensors)
    sidecar = hub.read_sidecar_config(path)
    model_name = model_name or hub.model_name_from_config(sidecar)
    if not model_name:
        raise WeightsError(f"{path}: name the model it holds with --model (one of jaxclf.models.list_models())")
    if model_name not in models.list_models():
        raise WeightsError(f"--model {model_name!r} is not a jaxclf model; see jaxclf.models.list_models()")
    options = {**fmt.model_options, **hub.model_options_from_config(sidecar), **_options_from_params(params)}
    if fmt.name == "vit_npz":
        options.update(vit.npz_model_options(tensors))
    preprocessing = {**fmt.preprocessing, "input_size": _input_size(model_name, options),
                     **hub.preprocessing_from_config(sidecar)}
    info = Pretrained(model_name, options, _num_classes(params, model_name, options), source, fmt.name, preprocessing)
    return params, info


def _num_classes(params: dict[str, np.ndarray], model_name: str, options: dict) -> int:
    """The class count of the weights' head (0 when they have none), found where the model keeps its head."""
    model = nnx.eval_shape(lambda: models.create(model_name, num_classes=1, **options))
    head_paths = model.head_paths()
    bias = next((params[k] for k in params if models.matches(k, head_paths) and k.endswith("bias")), None)
    return int(bias.shape[0]) if bias is not None else 0


def _options_from_params(params: dict[str, np.ndarray]) -> dict:
    """A ViT's token layout and image size, from its prefix tokens, position embedding and patch size.

    With register tokens, timm's `no_embed_class` models give only the patches a position: that is
    the case where the embedding's length is a square grid and minus the prefix tokens is not.
    """
    if "pos_embed" not in params or "patch_embed/kernel" not in params:
        return {}
    options = {}
    reg_tokens = params["reg_token"].shape[1] if "reg_token" in params else 0
    prefix = int("cls_token" in params) + reg_tokens
    positions = params["pos_embed"].shape[1]
    if reg_tokens:
        options["reg_tokens"] = reg_tokens
    if "cls_token" not in params:
        options["class_token"] = False
    if "fc_norm/scale" in params:
        options["global_pool"] = "avg"
    no_embed_class = prefix > 0 and _is_square(positions) and not _is_square(positions - prefix)
    if no_embed_class:
        options["no_embed_class"] = True
    grid = math.isqrt(positions if no_embed_class else positions - prefix)
    return {**options, "img_size": grid * params["patch_embed/kernel"].shape[0]}


def _is_square(n: int) -> bool:
    return math.isqrt(n) ** 2 == n


def _input_size(model_name: str, options: dict) -> int:
    if "img_size" in options:
        return int(options["img_size"])
    if model_name in efficientnet_models.INPUT_SIZES:
        return efficientnet_models.INPUT_SIZES[model_name]
    return 384 if model_name.endswith("_384") else 224


def save(out_dir: str, params: dict[str, np.ndarray], info: Pretrained) -> None:
    """Write converted weights as `out_dir/params.npz` + `out_dir/pretrained.json`."""
    os.makedirs(out_dir, exist_ok=True)
    np.savez(os.path.join(out_dir, PARAMS_FILE), **params)
    with open(os.path.join(out_dir, INFO_FILE), "w") as f:
        json.dump(info.to_json(), f, indent=2)


def is_converted(path: str) -> bool:
    return os.path.isfile(os.path.join(path, INFO_FILE))


def load(source: str, model_name: str = "") -> tuple[dict[str, np.ndarray], Pretrained]:
    """(params, info) for `config.model_init`: a finished jaxclf workdir (a `workdir.RunInfo`), a
    converted folder, any other weights file or folder (converted on the fly, as `model_name` when the
    source does not say), or a hub name (downloaded and converted once, then read from
    `weights/cache.py`'s cache). `hub.hub_repo` holds the rules that tell a hub name from a path."""
    if workdir.is_workdir(source):
        return workdir.load(source, model_name)
    if is_converted(source):
        return _read_converted(source)
    repo = hub.hub_repo(source)
    if repo is None:
        return convert(source, model_name)
    folder = hub.download(repo)
    entry = cache.entry_for(folder, model_name)
    if is_converted(entry):
        print(f"{repo}: converted weights from {entry}", file=sys.stderr)
        return _read_converted(entry)
    with progress.phase(f"converting {repo} (once: kept in {entry})"):
        params, info = convert(folder, model_name)
        info = dataclasses.replace(info, source=repo)
        cache.store(entry, lambda folder: save(folder, params, info))
    return params, _read_info(entry)  # as JSON gives it back, the same on every later start


def _read_converted(folder: str) -> tuple[dict[str, np.ndarray], Pretrained]:
    with np.load(os.path.join(folder, PARAMS_FILE)) as data:
        params = dict(data)
    return params, _read_info(folder)


def _read_info(folder: str) -> Pretrained:
    with open(os.path.join(folder, INFO_FILE)) as f:
        return Pretrained(**json.load(f))


def apply(
    model: nnx.Module,
    params: dict[str, np.ndarray],
    *,
    dont_load: tuple[str, ...] = (),
    pos_interpolation: str = "bilinear",
) -> list[str]:
    """Load `params` into `model` in place after fitting them (head, position embedding, strict keys);
    returns notes on what was changed for the caller to print."""
    state = nnx.state(model, nnx.Not(nnx.RngState))  # weights hold params and statistics, not dropout keys
    target = {name: tuple(leaf.shape) for name, leaf in tree_paths.flatten(state).items()}
    fitted, notes = surgery.fit(params, target, head_paths=model.head_paths(),
                                pos_embed_prefix_tokens=model.pos_embed_prefix_tokens(), dont_load=dont_load,
                                pos_interpolation=pos_interpolation)
    new_state = _replace_leaves(state, fitted)
    nnx.update(model, new_state)
    return notes


def _replace_leaves(state, values: dict[str, np.ndarray]):
    def replace(path, leaf):
        name = tree_paths.path_name(path)
        return np.asarray(values[name], dtype=leaf.dtype) if name in values else leaf

    return jax.tree_util.tree_map_with_path(replace, state)


def load_pretrained(source: str, num_classes: int | None = None, **model_options) -> tuple[nnx.Module, Pretrained]:
    """The model `source` holds, loaded and in eval mode, with the preprocessing it expects.

    `num_classes` other than the weights' resets the head to zeros; `model_options` (e.g. `img_size`)
    override the weights' own, resampling the position embedding where the size changes.
    """
    params, info = load(source)
    options = {**info.model_options, **model_options}
    model = models.create(info.model_name, num_classes=num_classes or info.num_classes or 1000, **options)
    for note in apply(model, params):
        print(f"jaxclf.load_pretrained: {note}")
    model.eval()
    if "img_size" in options:
        info = dataclasses.replace(info, preprocessing={**info.preprocessing, "input_size": options["img_size"]})
    return model, info
