"""Run configuration: the defaults of every field, loading config files, and command-line overrides.

A config file is a Python file with `get_config(arg=None) -> ConfigDict` that starts from
`base_config()` and changes what its experiment needs. Every field the code reads has its default
here, so this file is the one list of hyper-parameters; a field that is not here is an error.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import re
from typing import Any

import ml_collections

# Subtrees whose keys are free-form (passed on as keyword arguments and checked by their user).
FREE_FORM_FIELDS = ("model", "evals")


class ConfigError(ValueError):
    """A mistake in a config file or an override; the message names the field and the fix."""


def base_config() -> ml_collections.ConfigDict:
    """Every field jaxclf reads, with its default."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model_name = "resnet18"  # a name from jaxclf.models.list_models()
    # Keyword arguments of that model (e.g. img_size, drop_path_rate; models.options(name) lists them).
    # `kernels` ("auto", "plain", "cpu", "gpu"; jaxclf/kernels) picks the formulations; "auto" is
    # resolved for the mesh's platform and config.json records the result.
    c.model = ml_collections.ConfigDict()
    c.num_classes = 0  # 0: the number of classes found in the data
    # Pretrained weights: a folder from `python -m jaxclf.convert`, a weights file or a hub name.
    c.model_init = ""
    c.model_init_dont_load = ()  # regexes of param paths to leave at their fresh initialisation
    c.model_init_pos_interpolation = "bilinear"  # ViT position embeddings for a new img_size: or "bicubic"
    # Continual learning: with model_init = a finished jaxclf workdir (DIR[:best|last|STEP]), the run
    # continues that model: head rows matched by class name, new classes added (README "Continual learning").
    c.continual = ml_collections.ConfigDict()
    c.continual.drop_classes = False  # allow old classes that neither the new data nor the replay set has
    c.continual.keep_preprocessing = True  # take the old run's data.pp_train, pp_eval, mean and std
    # Rehearsal data of the old classes: "" = the old run's exemplars/ if it wrote them, else its own
    # training data (its config.json); "none"; or a folder PATH/<class>/* (or PATH/train/<class>/*).
    c.continual.replay = ""
    c.continual.replay_fraction = 0.0  # this share of every batch comes from the replay data
    c.continual.replay_per_class = 0  # > 0: replay at most this many (seeded random) per class; also written
    #   to workdir/exemplars/train/<class>/ for every class of this run, the next update's default replay
    c.continual.distill_old = 0.0  # > 0: Learning-without-Forgetting weight: the old model's logits on the old classes
    c.continual.temperature = 2.0  # LwF's softmax temperature

    c.data = ml_collections.ConfigDict()
    # "folder": root/<split>/<class>/*; "list": CSV/JSONL files of filename,label (names relative to
    # root); "tfds": the TFDS data set tfds_name, read from root ("": TFDS's data dir). See jaxclf/data.
    c.data.source = "folder"
    c.data.root = ""  # folder holding <train_split>/<class>/* and optionally <val_split>/<class>/*
    c.data.tfds_name = ""  # source="tfds": e.g. "cifar10" or "oxford_iiit_pet:4.*.*"
    c.data.prepare = ""  # "" or "sklearn_digits": write that data set to `root` first (once)
    # Split names: folders (folder), .csv/.jsonl files (list) or TFDS splits such as "train[:90%]".
    c.data.train_split = "train"
    c.data.val_split = "val"
    c.data.test_split = "test"  # optional: used where it exists
    c.data.val_fraction = 0.0  # > 0 and no val split: hold out this fraction of train, per class
    c.data.test_fraction = 0.0  # > 0 and no test split: hold out this fraction of train (e.g. 0.15 with val 0.15)
    c.data.split_seed = 0
    c.data.classes = ()  # only these class names of the data (e.g. ("0", "1") of the digits); (): every class
    c.data.bad_images = "error"  # an undecodable image: "error" stops naming it; "skip" replaces it (counted)
    # The most pixels (width x height) an image may have: a larger one is refused from its header, before
    # decoding (a 3 kB PNG can declare 144 M pixels, ~0.4 GB decoded), as an unreadable image; the same
    # limit in training, the data check, evaluate, predict and serve (whose --max_image_pixels overrides it).
    c.data.max_image_pixels = 89_478_485  # Pillow's default (above twice it, raise PIL.Image.MAX_IMAGE_PIXELS too)
    # Checking the data when a run starts (jaxclf/data/check.py; report in workdir/data_check.json):
    # "fast" reads every file's header and end marker (no decoding; TFDS is skipped), "full" also
    # decodes every image and looks for duplicates, "off". Unreadable files fail the run at once
    # with bad_images="error"; with "skip" they are listed and skipped.
    c.data.check = "fast"
    c.data.sampling = "uniform"  # "uniform" (each epoch a permutation) or "balanced" (classes drawn equally)
    c.data.class_weights = "none"  # loss weights: "none", "balanced" (n / (C * count)) or "w0,w1,..."
    # Per-example ops run in grain worker processes; images stay uint8 (see jaxclf/data/ops/).
    c.data.pp_train = "decode|inception_crop(224)|flip_lr"
    c.data.pp_eval = "decode|resize_small(256)|central_crop(224)"
    # Normalisation runs on the device, inside the jitted step: (image / 255 - mean) / std.
    # Empty: the mean/std stored with `model_init`'s weights, else ImageNet's.
    c.data.mean = ()
    c.data.std = ()
    c.data.num_workers = -1  # grain worker processes; -1: from the CPU count

    c.batch_size = 128  # global, over all devices and hosts
    c.param_sharding = "replicate"  # "replicate" (data parallel) or "fsdp" (params + optimizer state split too)
    c.eval_batch_size = 0  # 0: batch_size
    c.num_epochs = 10.0
    c.total_steps = 0  # > 0: train this many steps instead of num_epochs

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "sgd"  # "sgd" (with momentum), "adamw", "lamb" or "lion"
    c.optim.lr = 0.01  # peak learning rate, reached after warmup
    c.optim.momentum = 0.9  # sgd
    c.optim.nesterov = False  # sgd
    c.optim.b1 = 0.9  # adamw, lamb, lion
    c.optim.b2 = 0.999  # adamw, lamb, lion
    c.optim.weight_decay = 1e-4  # weight matrices and conv kernels only: not biases, norms, model.no_weight_decay()
    c.optim.schedule = "cosine"  # after warmup: "cosine", "linear", "step" or "constant"
    # Warmup length: set at most one of these three.
    c.optim.warmup_steps = 0
    c.optim.warmup_epochs = 0.0
    c.optim.warmup_fraction = 0.0  # of the whole run
    c.optim.end_lr_fraction = 0.0  # cosine/linear: final lr = lr * end_lr_fraction
    c.optim.step_epochs = ()  # schedule="step": multiply the lr by step_factor at each of these epochs
    c.optim.step_fractions = ()  # schedule="step": or at these fractions of the run (BiT-HyperRule: 0.3, 0.6, 0.9)
    c.optim.step_factor = 0.1
    c.optim.clip_grad_norm = 0.0  # > 0: clip gradients to this global norm
    c.optim.accumulate_steps = 1  # split each batch into this many micro-batches, one update (saves memory)
    c.optim.layer_decay = 0.0  # > 0: lr * layer_decay ** (depth from the top): ViT blocks, ResNet stages
    c.optim.head_lr_mult = 1.0  # lr multiplier for the model's head (model.head_paths()), or head_regex's params
    c.optim.head_regex = ""  # "": the model's head; else a regex searched in parameter paths
    c.optim.freeze = ""  # regex of parameter paths left unchanged, e.g. "^(?!fc/)" for a linear probe

    # Parameter-efficient fine-tuning (jaxclf/models/peft.py): method "lora" trains low-rank adapters beside the
    # layers `targets` match (regexes searched in module paths, e.g. "qkv", "proj", "fc1", "fc2" of a ViT,
    # "conv" or "layer4/.*/conv[13]" of a ResNet; never the head) and the head, nothing else; finished
    # runs are merged into plain weights when loaded (evaluate, predict, export, serve).
    c.peft = ml_collections.ConfigDict()
    c.peft.method = ""  # "" (every param trained, or optim.freeze's choice) or "lora"
    c.peft.rank = 8
    c.peft.alpha = 16.0  # the update is scaled by alpha / rank
    c.peft.dropout = 0.0  # dropout on the adapters' input
    c.peft.targets = ("qkv", "proj", "fc1", "fc2")

    # Gradual magnitude pruning while fine-tuning (jaxclf/training/pruning.py, docs/pruning.md): Zhu & Gupta's
    # cubic schedule from initial_sparsity at step `start` to `sparsity` at step `end`, masks recomputed every
    # `every` steps; pruned weights are exactly zero (they compress; dense kernels still compute them).
    c.prune = ml_collections.ConfigDict()
    c.prune.sparsity = 0.0  # > 0: this fraction of the prunable weights is zero from step `end` on; 0: off
    c.prune.initial_sparsity = 0.0
    c.prune.start = 0  # first pruning step
    c.prune.end = 0  # the step the target is reached; 0: the run's last step
    c.prune.every = 10  # steps between mask updates
    c.prune.scope = "global"  # "global": one magnitude ranking over all prunable weights; "per_layer": each param
    # Regexes of param paths left dense; "<stem>": the model's layer_id 0 (first conv, patch embedding),
    # "<head>": its head_paths(). Only conv kernels and weight matrices are prunable (not biases, norms, posembs).
    c.prune.keep_dense = ("<stem>", "<head>")

    c.freeze_bn_stats = False  # BatchNorm uses and keeps its running statistics while training
    c.label_smoothing = 0.0
    # Mixup / cutmix on the device: mixed with probability mix_prob; cutmix with mix_switch_prob when both.
    c.mixup_alpha = 0.0
    c.cutmix_alpha = 0.0
    c.mix_prob = 1.0
    c.mix_switch_prob = 0.5
    c.ema_decay = 0.0  # > 0: keep an exponential moving average of the params; evaluated as val_ema/*
    # Training tasks registered by user code (jaxclf.tasks.registry) this run adds to the ones its config
    # implies (classification always; distillation with distill.teacher; continual with a workdir model_init).
    c.tasks = ()
    # Knowledge distillation (README "Distillation"): loss = (1 - alpha) * cross-entropy + alpha * distillation.
    c.distill = ml_collections.ConfigDict()
    c.distill.teacher = ""  # a finished jaxclf workdir (DIR[:best|last|STEP]) or pretrained weights (path, hub name)
    c.distill.alpha = 0.5  # 0: off (as with no teacher); 1: the teacher's targets only
    c.distill.mode = "soft"  # "soft": T^2 * KL on temperature-scaled logits; "hard": the teacher's argmax as targets
    c.distill.temperature = 4.0  # soft mode
    c.distill.image_size = 0  # teacher input size; 0: its recorded one (images resized on the device), else as is
    c.distill.dtype = "auto"  # the teacher's compute dtype; "auto": the run's config.dtype
    # Compute dtype: "float32", "bfloat16" (params, loss and softmax stay float32), or "auto":
    # bfloat16 on GPUs and TPUs, float32 on CPUs. config.json records the one a run used.
    c.dtype = "auto"

    c.nonfinite_loss = "stop"  # a NaN/Inf loss: "stop" the run, or "skip" that step's update (counted)

    # (start, end): a jax.profiler trace of train steps start..end into the workdir (jaxclf/training/profiling.py),
    # for TensorBoard's profile plugin or xprof; (): none.
    c.profile_steps = ()
    c.log_every_steps = 50
    # Experiment trackers beside metrics.jsonl and TensorBoard: "wandb" (pip install 'jaxclf[wandb]') and/or
    # "mlflow" ('jaxclf[mlflow]'). They get the config, every metrics.jsonl scalar, the result, the plots and
    # evaluate's report, from a background thread (jaxclf/tracking/trackers.py; docs/training.md "Tracking").
    c.trackers = ()
    c.tracking = ml_collections.ConfigDict()
    c.tracking.run_name = ""  # "": the workdir's folder name
    c.tracking.queue_size = 1000  # calls waiting per tracker; more are dropped (and counted), never waited for
    c.tracking.finish_timeout_s = 120.0  # at the end of a run, how long to wait for a tracker to send what it holds
    c.tracking.wandb = ml_collections.ConfigDict()
    c.tracking.wandb.project = "jaxclf"
    c.tracking.wandb.entity = ""  # "": your default entity
    c.tracking.wandb.mode = ""  # "online", "offline" (kept on disk for `wandb sync`); "": WANDB_MODE, else online
    c.tracking.wandb.dir = ""  # where wandb/ with the run files goes; "": the workdir
    c.tracking.wandb.tags = ()
    c.tracking.mlflow = ml_collections.ConfigDict()
    c.tracking.mlflow.tracking_uri = ""  # "": MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db)
    c.tracking.mlflow.experiment = "jaxclf"
    c.tracking.mlflow.artifact_location = ""  # where a new experiment keeps its files; "": the server's default
    c.eval_every_epochs = 1.0  # also evaluates at the end
    # Evaluators ({name: {"type": ..., "prefix": "NAME/", "every_epochs": eval_every_epochs, ...}}, see
    # jaxclf/evaluation: classification, and knn, fewshot, linear_probe on frozen features, docs/backbones.md);
    # empty: {"val": {"type": "classification", "split": "val", "prefix": "val/"}}.
    c.evals = ml_collections.ConfigDict()
    c.checkpoint_every_steps = 0  # 0: at every evaluation; always at the end and on a stop signal
    c.keep_checkpoints = 2  # the latest N, plus the best by best_metric
    # A key of the evaluation metrics (val/*, val_ema/*); with ema_decay > 0, val/* means val_ema/*.
    c.best_metric = "val/accuracy"
    c.best_mode = "max"  # "max" or "min"
    c.early_stopping_patience = 0  # > 0: stop after this many evaluations without a new best
    return c


def load_config(path: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    """Load `path[:arg]`, apply `a.b=value` overrides, and check every field against `base_config()`."""
    config = _load_config_file(path)
    for override in overrides:
        apply_override(config, override)
    validate(config)
    return config


def _load_config_file(path_and_arg: str) -> ml_collections.ConfigDict:
    path, _, arg = path_and_arg.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    module = import_file(path)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config()")
    config = module.get_config(arg) if arg else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"get_config() in {path!r} must return an ml_collections.ConfigDict")
    return config


def import_file(path: str):
    """Run the Python file at `path` as a module and return it (config files; files that register models)."""
    spec = importlib.util.spec_from_file_location(f"jaxclf_file_{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_override_args(args: list[str]) -> list[str]:
    """`--config.a.b=VALUE` (or `--config.a.b VALUE`) command-line items as "a.b=VALUE" overrides.

    Raises ConfigError naming the first item that is not one.
    """
    overrides, rest = [], list(args)
    while rest:
        item = rest.pop(0)
        if not item.startswith("--config."):
            raise ConfigError(f"unrecognised argument {item!r}: overrides look like --config.a.b=VALUE")
        if "=" not in item and rest:
            item = f"{item}={rest.pop(0)}"
        overrides.append(item[len("--config."):])
    return overrides


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """Set one field from `a.b=value`; the value is parsed to the field's current type."""
    key, sep, text = override.partition("=")
    if not sep:
        raise ConfigError(f"override {override!r} must look like --config.{key}=VALUE")
    *parents, leaf = key.split(".")
    node = config
    free_form = bool(parents) and parents[0] in FREE_FORM_FIELDS
    for i, name in enumerate(parents):
        if free_form and i > 0 and name not in node:  # e.g. --config.evals.test.split=test adds evals.test
            with node.unlocked():
                node[name] = ml_collections.ConfigDict()
        if name not in node or not isinstance(node[name], ml_collections.ConfigDict):
            _raise_unknown(".".join(parents[: i + 1]))
        node = node[name]
    if leaf not in node and not free_form:
        _raise_unknown(key)
    current = node[leaf] if leaf in node else None
    value = _parse_value(text, current, key)
    with node.unlocked():
        node[leaf] = value


def _parse_value(text: str, current: Any, key: str) -> Any:
    if isinstance(current, str):
        return text
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"config.{key} is a bool; got {text!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text  # a new free-form field given as a bare word
        if isinstance(current, (tuple, list)):
            return type(current)(text.split(","))  # --config.trackers=wandb,mlflow: a list of bare words
        raise ConfigError(f"config.{key}: cannot parse {text!r} as {type(current).__name__}") from None
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, ml_collections.ConfigDict) and isinstance(value, dict):
        return ml_collections.ConfigDict(value)
    if current is not None and not isinstance(value, type(current)):
        if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
            return type(current)(value)
        raise ConfigError(f"config.{key} must be {type(current).__name__}; got {text!r}")
    return value


def validate(config: ml_collections.ConfigDict) -> None:
    """Fail on a field `base_config()` does not know, or one whose type differs from its default."""
    _check_node(config, base_config(), prefix="")


def _check_node(node, reference, prefix: str) -> None:
    for key in node.keys():
        path = f"{prefix}{key}"
        if key not in reference:
            _raise_unknown(path)
        if key in FREE_FORM_FIELDS and not prefix:
            continue
        value, default = node[key], reference[key]
        if isinstance(default, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ConfigError(f"config.{path} must be a ConfigDict of fields, not {value!r}")
            _check_node(value, default, f"{path}.")
        elif not _same_kind(value, default):
            raise ConfigError(
                f"config.{path} must be {type(default).__name__} (default {default!r}); got {value!r}"
            )


def _same_kind(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list))
    return isinstance(value, type(default))


def _all_keys(node, prefix: str = "") -> list[str]:
    keys = []
    for key in node.keys():
        keys.append(f"{prefix}{key}")
        if isinstance(node[key], ml_collections.ConfigDict):
            keys.extend(_all_keys(node[key], f"{prefix}{key}."))
    return keys


def _raise_unknown(key: str) -> None:
    known = _all_keys(base_config())
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" Did you mean config.{close[0]}?" if close else ""
    raise ConfigError(f"config.{key} is not a jaxclf config field.{hint} (All fields: jaxclf/config.py)")


def default_workdir(config_arg: str) -> str:
    """`runs/<config file stem>[_<ARG>]` for `--config FILE[:ARG]`: the same command finds the same
    run again (and resumes it); ARG's characters other than letters, digits, '.', '-' become '_'."""
    path, _, arg = config_arg.partition(":")
    stem = os.path.splitext(os.path.basename(path))[0]
    suffix = re.sub(r"[^\w.-]+", "_", arg).strip("_")
    return os.path.join("runs", f"{stem}_{suffix}" if suffix else stem)


class ClassRegistry:
    """Subclasses of `base` that configs name by their `key` attribute (a task's `name`, an evaluator's
    `type`): the built-in ones, then those user code registers."""

    def __init__(self, base: type, key: str, builtin: tuple[type, ...]):
        self.base, self.key = base, key
        self._classes: dict[str, type] = {}
        for cls in builtin:
            self.register(cls)

    def register(self, cls: type) -> type:
        """Add `cls` under its key and return it (a class decorator); registering the same class again is a no-op."""
        name = getattr(cls, self.key, "") if isinstance(cls, type) and issubclass(cls, self.base) else ""
        if not name:
            raise TypeError(f"{cls!r}: register a subclass of {self.base.__module__}.{self.base.__qualname__} "
                            f"with a {self.key}")
        if self._classes.get(name, cls) is not cls:
            raise ValueError(f"{self.key} {name!r} is already registered ({self._classes[name].__qualname__})")
        self._classes[name] = cls
        return cls

    def __contains__(self, name: str) -> bool:
        return name in self._classes

    def __getitem__(self, name: str) -> type:
        return self._classes[name]

    def classes(self) -> tuple[type, ...]:
        """Every registered class, built-in ones first, in registration order."""
        return tuple(self._classes.values())

    def names(self) -> list[str]:
        return sorted(self._classes)
