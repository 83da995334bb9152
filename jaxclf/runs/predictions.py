"""A loaded model's predictions over a labelled data source: what evaluation, quantization and continual
learning's old-model accuracy all compute, the same way."""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax, logsumexp

from jaxclf.data import pipeline, sources
from jaxclf.runs import inference

TTA_MODES = ("none", "flip")


def predict_source(
    trained: inference.LoadedModel, source: sources.LabelledSource, *, batch_size: int, tta: str = "none"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log_probs float64[N, C], labels int64[N], indices int64[N]) for the readable examples of `source`.

    `indices` are the positions in `source` (an unreadable image skipped under
    data.bad_images="skip" leaves a gap). With tta="flip", probabilities of the image and its
    mirror image are averaged.
    """
    if tta not in TTA_MODES:
        raise inference.WorkdirError(f"--tta {tta}: use one of {TTA_MODES}")
    log_probs, labels, indices = [], [], []
    batches = pipeline.eval_batches(
        source, trained.config.data.pp_eval, global_batch_size=batch_size,
        num_workers=trained.config.data.num_workers, bad_images=trained.config.data.bad_images,
        max_image_pixels=trained.config.data.max_image_pixels,
    )
    for batch in batches:
        scores = log_softmax(trained.logits(batch["image"]).astype(np.float64), axis=-1)
        if tta == "flip":
            flipped = log_softmax(trained.logits(batch["image"][:, :, ::-1]).astype(np.float64), axis=-1)
            scores = logsumexp(np.stack([scores, flipped]), axis=0) - np.log(2.0)
        mask = np.asarray(batch["mask"], bool)
        log_probs.append(scores[mask])
        labels.append(np.asarray(batch["label"])[mask])
        indices.append(np.asarray(batch["index"])[mask])
    return np.concatenate(log_probs), np.concatenate(labels).astype(np.int64), np.concatenate(indices)
