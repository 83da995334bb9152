"""Write scikit-learn's digits (1797 8x8 images) as an image folder: the quickstart data, no download."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

from jaxclf.data.sources import DataError

MARKER = ".digits_complete.json"


def write_digits_folder(root: str, *, image_size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> str:
    """Write `root/{train,val}/<digit>/<i>.png` (grayscale uint8[image_size, image_size]) once; return `root`.

    The split is stratified and seeded. Files go to a temporary folder renamed to `root` when
    complete, so an interrupted write never looks finished; a finished one is reused as is.
    """
    from sklearn.datasets import load_digits  # imported here: only the quickstart needs scikit-learn
    from sklearn.model_selection import train_test_split

    root = os.path.abspath(os.path.expanduser(root))
    params = {"image_size": image_size, "val_fraction": val_fraction, "seed": seed}
    if _is_complete(root, params):
        return root
    if os.path.exists(root) and os.listdir(root):
        raise DataError(f"{root} exists but holds no complete digits folder; remove it or choose another root")

    digits = load_digits()
    # Pixel values run 0..16; spread them over 0..255.
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    indices = np.arange(len(images))
    train_idx, val_idx = train_test_split(
        indices, test_size=val_fraction, stratify=digits.target, random_state=seed
    )
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the data set is not
    try:
        for split, split_idx in (("train", train_idx), ("val", val_idx)):
            for digit in range(10):
                os.makedirs(os.path.join(tmp, split, str(digit)))
            for i in split_idx:
                img = Image.fromarray(images[i]).resize((image_size, image_size), Image.BICUBIC)
                img.save(os.path.join(tmp, split, str(digits.target[i]), f"{i}.png"))
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump(params, f)
        try:
            os.replace(tmp, root)  # atomic; also replaces an empty `root`
        except OSError:
            # Another process (another host on a shared disk) finished first.
            if not _is_complete(root, params):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _is_complete(root: str, params: dict) -> bool:
    """Whether `root` holds a finished write with `params`; a finished one with other params is an error."""
    try:
        with open(os.path.join(root, MARKER)) as f:
            written = json.load(f)
    except FileNotFoundError:
        return False
    if written != params:
        raise DataError(f"{root} holds digits written with {written}, not {params}; remove it or choose another root")
    return True
