"""A small TFDS image classification set prepared as ArrayRecord files, without TensorFlow.

TFDS encodes numpy images through TensorFlow, so the builder hands it PNG bytes made by Pillow;
everything else (serialising, shuffling, writing ArrayRecord shards and the metadata) is TFDS's
own code, and `tfds.data_source` reads the result as it would a set made by `tfds build`.
"""

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

CLASS_NAMES = ("cat", "dog", "fox")
SPLIT_SIZES = {"train": 24, "test": 8}
IMAGE_SIZE = 32


def label_of(key: int) -> int:
    """The label the builder gives the example with integer key `key` (the labels are not uniform)."""
    return [0, 0, 1, 2][key % 4]


class JaxclfTestImages(tfds.core.GeneratorBasedBuilder):
    """Random 32x32 RGB images in three classes (registered with TFDS as "jaxclf_test_images")."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
        }))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split, size) for split, size in SPLIT_SIZES.items()}

    def _generate_examples(self, split: str, size: int):
        rng = np.random.default_rng(len(split))
        for key in range(size):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)).save(png, format="PNG")
            png.seek(0)
            yield key, {"image": png, "label": label_of(key)}


def prepare(data_dir: str) -> str:
    """Writes the set under `data_dir` and returns its TFDS name."""
    builder = JaxclfTestImages(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder.name
