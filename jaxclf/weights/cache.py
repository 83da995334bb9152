"""Hub weights converted once and kept, so later runs start without converting them again.

An entry is an ordinary converted folder (`params.npz` + `pretrained.json`) under
`$JAXCLF_CACHE/converted/<key>` (default `$XDG_CACHE_HOME/jaxclf`, i.e. `~/.cache/jaxclf`), where the
key hashes the downloaded files' contents and the model name asked for: new weights under the same
hub name get a new entry, and deleting the folder only costs one conversion.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable

# Part of every key: bump it when a converter's output changes, so older conversions are not reused.
FORMAT_VERSION = 1
_HASHED_FILES = ("model.safetensors", "pytorch_model.bin", "config.json", "preprocessor_config.json")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def cache_root() -> str:
    """`$JAXCLF_CACHE`, else `$XDG_CACHE_HOME/jaxclf` (`~/.cache/jaxclf`)."""
    default = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "jaxclf")
    return os.path.expanduser(os.environ.get("JAXCLF_CACHE", default))


def entry_for(folder: str, model_name: str) -> str:
    """The cache folder for the weights in hub snapshot `folder` converted as `model_name` ("" = the config's)."""
    key = hashlib.sha256(f"v{FORMAT_VERSION}:{model_name}".encode())
    for name in _HASHED_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            key.update(f"{name}:{file_sha256(path)}".encode())
    return os.path.join(cache_root(), "converted", key.hexdigest()[:32])


def file_sha256(path: str) -> str:
    """The file's SHA-256; read from the name of its blob where huggingface_hub stores it by that hash."""
    blob = os.path.basename(os.path.realpath(path))
    if _SHA256.match(blob):  # the Hugging Face cache names large (LFS) files' blobs by their SHA-256
        return blob
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def store(entry: str, write: Callable[[str], None]) -> None:
    """Fill `entry` through `write(folder)` atomically: written beside it, then renamed (a killed
    conversion leaves no half entry; of two processes converting at once, the first rename wins)."""
    partial = f"{entry}.partial-{os.getpid()}"
    write(partial)
    try:
        os.replace(partial, entry)
    except OSError:  # another process stored it first
        shutil.rmtree(partial, ignore_errors=True)
