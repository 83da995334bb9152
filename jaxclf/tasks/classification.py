"""Plain classification, the task of every run: the cross-entropy against the (smoothed, mixed,
class-weighted) targets is the first term of the loss."""

from __future__ import annotations

import ml_collections

from jaxclf.tasks import base
from jaxclf.training import steps


class Classification(base.Task):
    name = "classification"

    @classmethod
    def applies(cls, config: ml_collections.ConfigDict, pretrained_info: object | None) -> bool:
        return True

    def loss(self, loss: steps.Loss, class_names: tuple[str, ...]) -> steps.Loss:
        return loss.plus("cross_entropy", steps.weighted_cross_entropy)
