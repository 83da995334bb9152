"""Read a weights file into a flat {name: numpy array} dict, whatever wrote it.

`.safetensors` and `.npz` are read with numpy alone; `.pth`/`.pt`/`.bin` need torch and are
always loaded with `weights_only=True` (no pickled code runs). A Hugging Face model folder is read
through its `model.safetensors` (or `pytorch_model.bin`). Wrappers that training scripts add
(`{"state_dict": ...}`, `{"model": ...}`, `module.` from DataParallel, `_orig_mod.` from
torch.compile) and the npz prefixes `opt/target/` and `params/` are removed.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# safetensors dtype names -> numpy dtypes (bfloat16 via ml_dtypes, which JAX ships).
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state", "params")
_NAME_PREFIXES = ("module.", "_orig_mod.")
_NPZ_PREFIXES = ("opt/target/", "params/")


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit; the message names the file and the key."""


def read_tensors(path: str) -> dict[str, np.ndarray]:
    """All arrays in the weights file or Hugging Face folder `path`, unwrapped, as float32 where floating."""
    if os.path.isdir(path):
        path = hf_weights_file(path)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path!r} does not exist")
    if path.endswith(".safetensors"):
        tensors = {_strip_prefixes(name): array for name, array in read_safetensors(path).items()}
    elif path.endswith(".npz"):
        tensors = _strip_npz_prefix(dict(np.load(path, allow_pickle=False)))
    elif path.endswith(TORCH_SUFFIXES):
        tensors = _read_torch(path)
    else:
        raise WeightsError(f"{path}: unknown weights format; expected .safetensors, .npz or one of {TORCH_SUFFIXES}")
    return {name: _as_float32(array) for name, array in tensors.items()}


def hf_weights_file(folder: str) -> str:
    """The weights file of a Hugging Face model folder."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise WeightsError(f"{folder} is a folder without model.safetensors or pytorch_model.bin")


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """A .safetensors file: 8-byte little-endian header length, a JSON header, then the raw tensors."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + header_len])
    except (struct.error, ValueError) as e:
        raise WeightsError(f"{path}: not a safetensors file ({e})") from None
    body = memoryview(data)[8 + header_len :]
    tensors = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        if spec["dtype"] not in _SAFETENSORS_DTYPES:
            raise WeightsError(f"{path}: tensor {name} has unsupported dtype {spec['dtype']}")
        start, end = spec["data_offsets"]
        dtype = np.dtype(_SAFETENSORS_DTYPES[spec["dtype"]])
        tensors[name] = np.frombuffer(body[start:end], dtype=dtype).reshape(spec["shape"]).copy()
    return tensors


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise WeightsError(
            f"{path} is a PyTorch file and torch is not installed; install torch (CPU is enough) or convert "
            "the file to .safetensors elsewhere"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for unreadable or unsafe files
        raise WeightsError(f"{path}: torch.load(weights_only=True) failed: {e}") from None
    return {name: value.detach().float().numpy() if value.is_floating_point() else value.numpy()
            for name, value in unwrap_state_dict(obj, path).items()}


def unwrap_state_dict(obj, path: str) -> dict:
    """The state dict inside training-script wrappers, with `module.`/`_orig_mod.` prefixes removed."""
    while isinstance(obj, dict) and not _looks_like_state_dict(obj):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise WeightsError(f"{path}: no state dict found; top-level keys: {sorted(obj)[:10]}")
        obj = inner
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return {_strip_prefixes(name): value for name, value in obj.items() if hasattr(value, "shape")}


def _looks_like_state_dict(obj: dict) -> bool:
    return any(hasattr(v, "shape") for v in obj.values())


def _strip_prefixes(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _NAME_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def _strip_npz_prefix(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for prefix in _NPZ_PREFIXES:
        if any(name.startswith(prefix) for name in tensors):
            return {name[len(prefix) :]: v for name, v in tensors.items() if name.startswith(prefix)}
    return tensors


def _as_float32(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) or array.dtype == ml_dtypes.bfloat16 else array
