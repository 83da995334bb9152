"""A finished run loaded back from its workdir: config, class names, the model with chosen weights, preprocessing.

evaluate, predict, export and explain all start from `load_trained(workdir, checkpoint)`, so they
agree on which weights and which preprocessing a run means. Inference runs on one device (the
first of `jax.devices()`), whatever devices trained the model.
"""

from __future__ import annotations

import abc
import argparse
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxclf.runs import checkpoint
from jaxclf import config as config_lib, models
from jaxclf.models import peft
from jaxclf.kernels import xla_cpu
from jaxclf.data import classes, ops as ops_lib, sources
from jaxclf.data.normalize import normalize_images

# Shapes tried by `TrainedModel.input_size` (portrait and landscape, larger than usual crops).
_PROBE_SHAPES = ((640, 480), (480, 640))


class WorkdirError(ValueError):
    """A workdir, checkpoint choice or input that inference cannot use; the message names it."""


# What the command-line tools report as a mistake in their arguments or data (exit status 2).
USER_ERRORS = (WorkdirError, config_lib.ConfigError, sources.DataError, checkpoint.CheckpointError)


class LoadedModel(abc.ABC):
    """What every tool that only runs a model needs, whatever holds the model (a workdir's checkpoint,
    an exported artefact): class names, logits of preprocessed images, the run's eval preprocessing.

    A subclass sets `config` (the run's; `config.data.pp_eval` is its eval preprocessing),
    `class_names`, `step`, `weights` and `model_name`, and defines `logits`, `format`,
    `provenance`, `eval_dir` and `_config_path` (where the preprocessing was read, for errors).
    """

    config: ml_collections.ConfigDict
    class_names: tuple[str, ...]
    step: int
    weights: str

    @property
    def model_name(self) -> str:
        return self.config.model_name

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.config.data.mean)

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.config.data.std)

    @abc.abstractmethod
    def logits(self, images: np.ndarray) -> np.ndarray:
        """uint8[B, H, W, 3] images after the eval preprocessing -> float32[B, C] logits."""

    @functools.cached_property
    def eval_ops(self) -> list[ops_lib.Op]:
        """The ops of `config.data.pp_eval`, checked: `decode` first (with config.data.max_image_pixels), nothing random."""
        operations = ops_lib.parse_ops(self.config.data.pp_eval)
        if not isinstance(operations[0], ops_lib.Decode):
            raise WorkdirError(f"data.pp_eval={self.config.data.pp_eval!r} in {self._config_path} must start with decode")
        operations[0] = dataclasses.replace(operations[0], max_pixels=self.config.data.max_image_pixels)
        random_ops = [type(op).__name__ for op in operations if isinstance(op, grain.transforms.RandomMap)]
        if random_ops:
            raise WorkdirError(f"data.pp_eval in {self._config_path} has random ops {random_ops}")
        return operations

    def load_image(self, path: str, data: bytes | None = None, max_pixels: int | None = None) -> np.ndarray:
        """The image file at `path` (or its encoded bytes `data`, which `path` then names) as the model
        sees it: uint8[H, W, 3] after `config.data.pp_eval`.

        Raises ops.BadImage (a DataError) naming the file when it cannot be decoded, ops.TooManyPixels
        when its header declares more than `max_pixels` (default: config.data.max_image_pixels).
        """
        example = {"path": path} if data is None else {"path": path, "bytes": data}
        decode, *rest = self.eval_ops
        if max_pixels is not None:
            decode = dataclasses.replace(decode, max_pixels=max_pixels)
        for op in (decode, *rest):
            example = op.map(example)
        return ops_lib.as_array(example["image"])

    def input_size(self) -> tuple[int, int] | None:
        """(height, width) every image has after the eval ops, or None if it depends on the image."""
        sizes = set()
        for shape in _PROBE_SHAPES:
            example = {"image": np.zeros((*shape, 3), np.uint8)}
            try:
                for op in self.eval_ops[1:]:
                    example = op.map(example)
            except ValueError:  # e.g. a crop larger than the probe
                return None
            sizes.add(ops_lib.as_array(example["image"]).shape[:2])
        return sizes.pop() if len(sizes) == 1 else None

    @property
    @abc.abstractmethod
    def _config_path(self) -> str:
        """Where the config was read (named in errors)."""


@dataclasses.dataclass
class TrainedModel(LoadedModel):
    """The model of a run in eval mode, with the weights of one checkpoint on one device.

    `weights` is "ema" (the run's exponential moving average) or "params" (the trained values).
    """

    workdir: str
    config: ml_collections.ConfigDict
    class_names: tuple[str, ...]
    model: nnx.Module
    step: int
    weights: str

    format = "jax"

    @property
    def provenance(self) -> dict:
        """Where the weights come from: the run, its checkpoint and which of its weights."""
        return {"workdir": os.path.abspath(self.workdir) if self.workdir else "", "checkpoint_step": self.step,
                "weights": self.weights}

    def eval_dir(self, split_name: str) -> str:
        """Where `jaxclf.evaluate` writes the reports of `split_name`: WORKDIR/eval/<split>."""
        return os.path.join(self.workdir, "eval", split_name)

    def apply(self, images: jax.Array) -> jax.Array:
        """uint8[B, H, W, 3] images after the eval preprocessing -> float32[B, C] logits (traceable, for export)."""
        return _logits(self.model, images, self.mean, self.std)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """`apply`, jitted with the weights passed as arguments (not baked into the program)."""
        return np.asarray(self._jitted_apply(self._state, images))

    @functools.cached_property
    def _state(self) -> nnx.State:
        return nnx.state(self.model)

    @functools.cached_property
    def _jitted_apply(self) -> Callable:
        graphdef, mean, std = nnx.graphdef(self.model), self.mean, self.std
        return jax.jit(
            lambda state, images: _logits(nnx.merge(graphdef, state), images, mean, std),
            compiler_options=xla_cpu.compiler_options(jax.default_backend()),
        )

    @property
    def _config_path(self) -> str:
        return os.path.join(self.workdir, "config.json")


def _logits(model: nnx.Module, images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    return model(normalize_images(images, mean, std)).astype(jnp.float32)


def load_trained(workdir: str, checkpoint_choice: str | int = "best", *, use_ema: bool = True) -> TrainedModel:
    """Load the run in `workdir` at `checkpoint_choice`: "best" (the best evaluation, else the latest),
    "last", or a step number. With `use_ema` and a run that kept an EMA of its params, those are used."""
    config = load_config(workdir)
    class_names = tuple(classes.load_class_names(workdir))
    if config.model_name not in models.list_models():
        raise WorkdirError(
            f"{workdir}/config.json names model {config.model_name!r}, which is not registered here; "
            "if a config file defined it, pass that file with --import_file"
        )
    abstract = nnx.eval_shape(lambda: _model_with_adapters(config, len(class_names)))
    abstract.eval()
    graphdef, params, model_state = nnx.split(abstract, nnx.Param, ...)
    weights = "ema" if use_ema and config.ema_decay > 0 else "params"
    on_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    as_target = functools.partial(
        jax.tree.map, lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_device)
    )
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise WorkdirError(f"{workdir}/checkpoints does not exist: is {workdir} the workdir of a training run?")
    checkpointer = checkpoint.Checkpointer(
        workdir, keep=config.keep_checkpoints, best_metric=config.best_metric, best_mode=config.best_mode
    )
    try:
        step = _choose_step(checkpointer, str(checkpoint_choice))
        field = {"ema": "ema_params", "params": "params"}[weights]
        restored = checkpointer.restore_state(step, {field: as_target(params), "model_state": as_target(model_state)})
    finally:
        checkpointer.close()
    model = nnx.merge(graphdef, restored[field], restored["model_state"])
    peft.merge(model)  # a LoRA run's adapters folded into plain weights
    return TrainedModel(workdir, config, class_names, model, step, weights)


def _model_with_adapters(config: ml_collections.ConfigDict, num_classes: int) -> models.Classifier:
    """The model of a run's config, with the LoRA adapters its `peft` added (so its checkpoint fits)."""
    model = models.create_model(config, num_classes)
    peft.from_config(model, config)
    return model


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run recorded in `workdir/config.json`, over today's defaults (for fields added since)."""
    path = os.path.join(workdir, "config.json")
    try:
        with open(path) as f:
            recorded = json.load(f)
    except FileNotFoundError:
        raise WorkdirError(f"{path} does not exist: is {workdir} the workdir of a training run?") from None
    config = config_lib.base_config()
    config.update(ml_collections.ConfigDict(recorded))
    return config


def _choose_step(checkpointer: checkpoint.Checkpointer, choice: str) -> int:
    steps = checkpointer.all_steps()
    if not steps:
        raise WorkdirError(f"{checkpointer.directory} holds no checkpoint")
    if choice == "best":
        return checkpointer.best_step()
    if choice == "last":
        return checkpointer.latest_step()
    if not choice.isdigit() or int(choice) not in steps:
        raise WorkdirError(f"--checkpoint {choice}: use best, last or one of the saved steps {sorted(steps)}")
    return int(choice)


def add_run_arguments(parser: argparse.ArgumentParser, workdir_required: bool = True) -> None:
    """The flags every inference tool shares: which run, which checkpoint, which weights."""
    parser.add_argument("--workdir", required=workdir_required, help="the training run's workdir")
    parser.add_argument("--checkpoint", default="best",
                        help="best (the best evaluation, else the latest), last, or a step number")
    parser.add_argument("--no_ema", action="store_true",
                        help="use the trained params even where the run kept an EMA of them")
    parser.add_argument("--import_file", action="append", default=[], metavar="FILE",
                        help="a Python file to run first, e.g. the config file that registers the run's model")


def load_from_args(args: argparse.Namespace) -> TrainedModel:
    """`load_trained` with the flags of `add_run_arguments`."""
    for path in args.import_file:
        _import_file(path)
    return load_trained(args.workdir, args.checkpoint, use_ema=not args.no_ema)


def _import_file(path: str) -> None:
    if not os.path.isfile(path):
        raise WorkdirError(f"--import_file {path}: no such file")
    config_lib.import_file(path)


def run_tool(main: Callable[[Sequence[str]], int], argv: Sequence[str] | None) -> int:
    """Run a tool's `main`, turning the errors a user can fix into one line on stderr and exit status 2."""
    try:
        return main(sys.argv[1:] if argv is None else list(argv))
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
