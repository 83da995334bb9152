"""Calibration images for static int8 quantization (ONNX and LiteRT): train images through the eval ops."""

from __future__ import annotations

import numpy as np

from jaxclf.data import pipeline
from jaxclf.evaluation import splits
from jaxclf.runs import inference


class _Subset:
    """Examples `indices` of a random-access source, as a source."""

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.source[int(self.indices[i])]


def calibration_images(trained: inference.LoadedModel, count: int, seed: int = 0) -> np.ndarray:
    """uint8[count, H, W, 3]: `count` images drawn at random from the run's train split, after its eval ops."""

    _, source = splits.load_split(trained, "train")
    if count > len(source):
        raise inference.WorkdirError(f"--calibration {count}: the train split has only {len(source)} images")
    indices = np.sort(np.random.default_rng(seed).choice(len(source), count, replace=False))
    images = []
    for batch in pipeline.eval_batches(_Subset(source, indices), trained.config.data.pp_eval,
                                       global_batch_size=min(count, 32), num_workers=trained.config.data.num_workers,
                                       bad_images=trained.config.data.bad_images,
                                       max_image_pixels=trained.config.data.max_image_pixels):
        images.append(np.asarray(batch["image"])[np.asarray(batch["mask"], bool)])
    return np.concatenate(images)
