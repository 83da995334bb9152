"""A finished jaxclf run as weights: `config.model_init = "runs/pets"` (or `runs/pets:best|last|STEP`).

The run's chosen checkpoint (its EMA where it kept one, as evaluate and export load) becomes the
flat params dict every other weights source gives, with what else the run knows: its class names
(classes.json), its preprocessing (pp ops, mean/std, input size) and its whole config, so that a
new run can continue it (continual learning) or learn from it (distillation).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from flax import nnx

from jaxclf.models import tree_paths
from jaxclf.runs import inference
from jaxclf.weights.files import WeightsError

CHOICES = ("best", "last")
RESULT_FILE = "result.json"


@dataclasses.dataclass
class RunInfo:
    """What a finished run tells a run that starts from it (the fields of `weights.Pretrained`, plus the run's own)."""

    model_name: str
    model_options: dict
    num_classes: int
    source: str
    source_format: str
    preprocessing: dict  # mean, std, input_size (or None), pp_train, pp_eval
    class_names: tuple[str, ...]
    workdir: str
    step: int
    config: dict  # the run's config.json (over today's defaults)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def parse(source: str) -> tuple[str, str] | None:
    """(workdir, checkpoint choice) if `source` names a jaxclf workdir (a folder holding config.json and
    checkpoints/, optionally followed by `:best`, `:last` or `:STEP`), else None."""
    path, choice = source, "best"
    head, sep, tail = source.rpartition(":")
    if sep and (tail in CHOICES or tail.isdigit()):
        path, choice = head, tail
    if os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "checkpoints")):
        return path, choice
    return None


def is_workdir(source: str) -> bool:
    return bool(source) and parse(source) is not None


def load_run(source: str) -> inference.TrainedModel:
    """The `inference.TrainedModel` of the finished run `source` names; WeightsError if it is not finished."""
    workdir, choice = parse(source)
    if not os.path.isfile(os.path.join(workdir, RESULT_FILE)):
        raise WeightsError(
            f"{workdir} is not a finished run (no {RESULT_FILE}: it is still training, was stopped or crashed); "
            "run its training command again until it ends, then start from it"
        )
    try:
        return inference.load_trained(workdir, choice)
    except inference.USER_ERRORS as e:
        raise WeightsError(str(e)) from None


def load(source: str, model_name: str = "") -> tuple[dict[str, np.ndarray], RunInfo]:
    """(params, info) of the run `source` names, for a model `model_name` (when given, it must be the
    run's: a workdir continues the same model family)."""
    trained = load_run(source)
    config = trained.config
    if model_name and model_name != config.model_name:
        raise WeightsError(
            f"{trained.workdir} trained {config.model_name!r}, not config.model_name={model_name!r}: continuing a "
            f"run keeps its model; set --config.model_name={config.model_name} (to move to another model, "
            "distil it instead: config.distill.teacher)"
        )
    params = {name: np.asarray(leaf) for name, leaf in tree_paths.flatten(nnx.state(trained.model)).items()}
    # The kernel set and remat policy are how to compute, chosen afresh by the run that loads the weights.
    options = {k: v for k, v in config.model.to_dict().items() if k not in ("kernels", "remat")}
    preprocessing = {
        "mean": tuple(config.data.mean), "std": tuple(config.data.std), "input_size": trained.input_size(),
        "pp_train": config.data.pp_train, "pp_eval": config.data.pp_eval,
    }
    info = RunInfo(
        model_name=config.model_name, model_options=options, num_classes=len(trained.class_names), source=source,
        source_format="jaxclf_workdir", preprocessing=preprocessing, class_names=tuple(trained.class_names),
        workdir=os.path.abspath(trained.workdir), step=trained.step, config=config.to_dict(),
    )
    return params, info
