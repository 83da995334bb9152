"""Where weights named by `config.model_init` come from: a local path or the Hugging Face hub.

The rules, in order (`hub_repo`):
1. an existing file or folder is a local path;
2. `hf:org/name` is a hub repository;
3. a value that looks like a path is a local path, and a missing one is an error that gives the
   convert command (the hub is not asked): absolute, `./`, `../`, `~`, more than one `/`, a
   weights-file suffix, or a name under jaxclf's own folders (`weights/`, `runs/`, `checkpoints/`);
4. any other `org/name` (`timm/resnet50.a1_in1k`, `google/vit-base-patch16-224`) is a hub repository.

Hub files arrive through huggingface_hub's own cache, so its environment variables hold
(`HF_HOME`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE`, `HF_TOKEN`) and an interrupted download resumes. A
folder's `config.json` (timm's `pretrained_cfg`, or transformers' model config) and
`preprocessor_config.json` supply the model name, its options and the preprocessing.
"""

from __future__ import annotations

import json
import os
import re

from jaxclf.weights import hf_towers
from jaxclf.weights.files import TORCH_SUFFIXES, WeightsError

HUB_PREFIX = "hf:"
_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")
_PATH_STARTS = ("/", "./", "../", "~")
_WEIGHTS_SUFFIXES = (".safetensors", ".npz", *TORCH_SUFFIXES)
# jaxclf's own folders: a name under them is a local path, never a hub organisation.
_LOCAL_ROOTS = ("weights", "runs", "checkpoints")
_WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")
_SIDECAR_FILES = ("config.json", "preprocessor_config.json")
_VIT_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large"}
_RESNET_DEPTHS = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}
_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}


def hub_repo(source: str) -> str | None:
    """The hub repository `source` names, or None when it is a local path (the rules above)."""
    if source.startswith(HUB_PREFIX):
        repo = source[len(HUB_PREFIX):]
        if not _HUB_NAME.match(repo):
            raise WeightsError(f"{source!r}: a hub name is hf:ORG/NAME, e.g. hf:timm/resnet50.a1_in1k")
        return repo
    if os.path.exists(source) or _looks_like_path(source) or not _HUB_NAME.match(source):
        return None
    return source


def _looks_like_path(source: str) -> bool:
    return (source.startswith(_PATH_STARTS) or source.count("/") > 1 or source.endswith(_WEIGHTS_SUFFIXES)
            or source.split("/")[0] in _LOCAL_ROOTS)


def resolve(source: str) -> str:
    """A local file or folder for `source`: the path itself, or the hub repository's downloaded folder."""
    repo = hub_repo(source)
    if repo:
        return download(repo)
    path = os.path.expanduser(source)
    if not os.path.exists(path):
        raise WeightsError(
            f"{source!r}: no such file or folder. Convert weights into it once with `python -m jaxclf.convert "
            f"WEIGHTS_FILE --model MODEL_NAME --out {source}`, or name weights on the Hugging Face hub "
            "(e.g. timm/resnet50.a1_in1k or hf:ORG/NAME)")
    return path


def download(repo: str) -> str:
    """The snapshot folder of hub repository `repo` holding its weights and config files (downloaded once
    into the Hugging Face cache; offline, read from it)."""
    try:
        import huggingface_hub
        from huggingface_hub import constants, errors
    except ImportError:
        raise WeightsError(f"{repo} is a hub name, but huggingface_hub is not installed "
                           "(`pip install huggingface_hub`)") from None
    # One request tells whether the hub answers; if not, read the cache only. Otherwise every file would
    # go through huggingface_hub's retries and back-off (measured: 52 s of warnings before the same error).
    cache_only = constants.HF_HUB_OFFLINE or not _hub_answers(huggingface_hub, errors, repo)
    folder, not_cached = None, False
    for name in _WEIGHTS_FILES:
        try:
            folder = os.path.dirname(huggingface_hub.hf_hub_download(repo, name, local_files_only=cache_only))
            break
        except errors.LocalEntryNotFoundError:  # offline or unreachable, and not in the cache
            not_cached = True
        except errors.EntryNotFoundError:  # the repository has no such file
            pass
        except (errors.RepositoryNotFoundError, errors.GatedRepoError, errors.RevisionNotFoundError) as e:
            raise WeightsError(f"{repo}: the hub has no such repository, or it needs a token (HF_TOKEN) "
                               f"({type(e).__name__})") from None
    if folder is None:
        if not_cached:
            raise WeightsError(_not_cached_message(repo, constants, cache_only))
        raise WeightsError(f"{repo} has neither {' nor '.join(_WEIGHTS_FILES)} on the hub: jaxclf reads those files")
    for name in _SIDECAR_FILES:
        try:
            huggingface_hub.hf_hub_download(repo, name, local_files_only=cache_only)
        except errors.EntryNotFoundError:  # optional files (a LocalEntryNotFoundError too)
            pass
    return folder


def _hub_answers(huggingface_hub, errors, repo: str) -> bool:
    """Whether the hub (HF_ENDPOINT) answers one request, without retries: any HTTP answer counts (even 404)."""
    try:
        huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(repo, _SIDECAR_FILES[0]))
    except errors.HfHubHTTPError:
        return True
    except Exception:  # noqa: BLE001 - refused, reset, DNS, proxy or timeout (httpx's errors): no answer
        return False
    return True


def _not_cached_message(repo: str, constants, cache_only: bool) -> str:
    url = f"https://huggingface.co/{repo}/resolve/main"
    why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else
           f"the hub ({constants.ENDPOINT}) cannot be reached" if cache_only else "the hub did not serve it")
    return (f"{repo} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}. Download it once "
            f"where there is network (`hf download {repo}`) and copy the cache here (or point HF_HUB_CACHE at "
            f"it), or download {url}/model.safetensors and {url}/config.json into one folder and pass that folder")


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
    return hf_towers.model_name(config)


def model_options_from_config(sidecar: dict) -> dict:
    """Model options a transformers ViT, Dinov2, SigLIP or CLIP config implies (LayerNorm epsilon, activation)."""
    config = sidecar.get("config", {})
    return {"norm_eps": config["layer_norm_eps"]} if config.get("model_type") == "vit" else hf_towers.model_options(config)


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
