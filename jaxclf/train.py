"""Train a classifier: `python -m jaxclf.train --config configs/NAME.py --workdir DIR [--config.a.b=VALUE ...]`.

Reads top to bottom: config -> data -> model -> optimizer and steps -> restore or init -> loop
(train, log, evaluate, checkpoint). A workdir that already holds a checkpoint is resumed.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jaxclf import (
    checkpoint,
    config as config_lib,
    data as data_lib,
    distributed,
    models,
    optim,
    plots,
    preemption,
    sharding,
    steps,
    weights,
)
from jaxclf.data import classes as data_classes, imbalance, pipeline, sources
from jaxclf.metrics import MetricsWriter

PREFETCH_BATCHES = 2


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    devices: list[jax.Device] | None = None,
    stop_at_step: int | None = None,
) -> dict[str, float]:
    """Run (or resume) training in `workdir`; return the last validation metrics.

    Raises `Preempted` after checkpointing when a stop signal arrives. `stop_at_step` ends the
    run early after checkpointing there (tests use it); `devices` restricts the mesh.
    """
    pretrained = _read_model_init(config)
    config.dtype = compute_dtype(config.dtype)  # config.json records the dtype "auto" chose
    _track_ema_as_best(config)
    _prepare_workdir(config, workdir)
    splits = data_lib.load_splits(config.data)
    train_set, val_set = splits["train"], splits["val"]
    num_classes = _check_num_classes(config, splits, workdir)

    mesh = sharding.make_mesh(devices)
    eval_batch_size = config.eval_batch_size or config.batch_size
    sharding.check_batch_size(config.batch_size, mesh, "batch_size")
    sharding.check_batch_size(eval_batch_size, mesh, "eval_batch_size")
    steps_per_epoch = len(train_set) // config.batch_size
    if steps_per_epoch == 0:
        raise config_lib.ConfigError(
            f"config.batch_size={config.batch_size} is larger than the {len(train_set)} training images"
        )
    total_steps = config.total_steps or math.ceil(config.num_epochs * steps_per_epoch)
    eval_every = max(1, round(config.eval_every_epochs * steps_per_epoch))
    checkpoint_every = config.checkpoint_every_steps or eval_every

    model = create_model(config, num_classes)
    if pretrained:
        _load_model_init(model, pretrained[0], config)
    try:
        tx, schedule = optim.make_optimizer(config.optim, nnx.state(model, nnx.Param), total_steps, steps_per_epoch)
    except optim.OptimConfigError as e:
        raise config_lib.ConfigError(str(e)) from None
    train_graphdef, eval_graphdef, state = steps.create_train_state(
        model, tx, ema=config.ema_decay > 0, freeze_bn_stats=config.freeze_bn_stats
    )
    try:
        state_sharding = sharding.state_sharding(state, mesh, config.param_sharding)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None
    state = jax.device_put(state, state_sharding)
    class_weights = imbalance.class_weights(config.data.class_weights, list(train_set.class_counts().values()))
    train_step = steps.make_train_step(
        train_graphdef, tx, mesh, config, num_classes, state_sharding, class_weights=class_weights
    )
    eval_step = steps.make_eval_step(
        eval_graphdef, mesh, state_sharding, mean=tuple(config.data.mean), std=tuple(config.data.std)
    )

    def make_train_iterator(num_workers: int):
        return iter(
            pipeline.make_train_loader(
                train_set,
                config.data.pp_train,
                global_batch_size=config.batch_size,
                seed=config.seed,
                num_workers=num_workers,
                sampling=config.data.sampling,
                bad_images=config.data.bad_images,
            )
        )

    # Decide how to initialise. The order matters:
    # 1. Resume from the newest readable checkpoint in workdir (a preempted or restarted job).
    # 2. Otherwise start from the freshly initialised model.
    checkpointer = checkpoint.Checkpointer(
        workdir, keep=config.keep_checkpoints, best_metric=config.best_metric, best_mode=config.best_mode
    )
    restored = checkpointer.restore_latest(
        state, lambda meta: make_train_iterator(_resumed_num_workers(meta, config.data.num_workers))
    )
    if restored:
        start_step, state, train_iter, meta = restored
        print(f"Resumed from {checkpointer.directory} at step {start_step}", file=sys.stderr)
    else:
        meta = {"num_workers": pipeline.resolve_num_workers(config.data.num_workers)}
        start_step, train_iter = 0, make_train_iterator(meta["num_workers"])
    early_stopping = EarlyStopping(config, meta.get("early_stopping"))

    eval_loader = pipeline.EvalLoader(val_set, config.data.pp_eval, global_batch_size=eval_batch_size,
                                      num_workers=config.data.num_workers, bad_images=config.data.bad_images)

    @jax.transfer_guard_device_to_host("allow")
    def evaluate() -> dict[str, float]:
        models_to_evaluate = {"val": state.params}
        if state.ema_params is not None:
            models_to_evaluate["val_ema"] = state.ema_params
        totals = {name: steps.zero_eval_totals(mesh) for name in models_to_evaluate}
        for batch in eval_loader.one_pass():
            batch = sharding.shard_batch(batch, mesh)
            for name, params in models_to_evaluate.items():
                totals[name] = eval_step(params, state.model_state, batch, totals[name])
        results = {}
        for name, sums in jax.device_get(totals).items():
            count = sums["count"]
            results.update({
                f"{name}/loss": sums["loss"] / count,
                f"{name}/accuracy": sums["top1"] / count,
                f"{name}/top5": sums["top5"] / count,
                f"{name}/examples": count,
            })
        return results

    writer = MetricsWriter(workdir)
    train_log = TrainLog(writer, schedule, config.batch_size, steps_per_epoch, config.nonfinite_loss, start_step,
                         meta.get("skipped", {}))
    end_step = total_steps if stop_at_step is None else min(stop_at_step, total_steps)
    val_metrics: dict[str, float] = {}

    def save(step: int, data_state: bytes, metrics: dict | None = None) -> None:
        train_log.flush(step)  # never checkpoint a state whose loss was not checked
        meta["early_stopping"] = early_stopping.state()
        meta["skipped"] = train_log.skipped()
        with jax.transfer_guard_device_to_host("allow"):
            checkpointer.save(step, state, checkpoint.IteratorState(data_state), meta, metrics)

    try:
        # On accelerators, any implicit device-to-host copy (a stray float(loss)) in the loop is an
        # error: the only host syncs are at logging, evaluation and checkpoint steps. (CPU arrays
        # already live in host memory, so the guard does not fire there.)
        with preemption.StopSignals() as signals, jax.transfer_guard_device_to_host("disallow"):
            batches = _prefetch_to_mesh(train_iter, mesh)
            data_state = None  # the data position after the newest trained batch
            for step in range(start_step + 1, end_step + 1):
                try:
                    batch, batch_data_state, skipped_images = next(batches)
                except Exception:
                    if signals.received is None:
                        raise
                    # A signal sent to the whole process group also ends the data workers:
                    # checkpoint the last completed step instead of failing.
                    if data_state is not None:
                        save(step - 1, data_state)
                    raise preemption.Preempted(step - 1, signals.received) from None
                state, metrics = train_step(state, batch)
                data_state = batch_data_state
                train_log.add({**metrics, "skipped_images": skipped_images})  # read back at the next log line
                log_now = step % config.log_every_steps == 0 or step == end_step
                stop_now = signals.should_stop(at_sync_point=log_now)
                if log_now:
                    train_log.flush(step)
                eval_metrics = None
                if (step % eval_every == 0 or step == total_steps) and not stop_now:
                    train_log.flush(step)  # the training window's throughput, before evaluation time
                    try:
                        eval_metrics = val_metrics = evaluate()
                    except Exception:
                        if signals.received is None:
                            save(step, data_state)  # keep the training done; the evaluation's error follows
                            raise
                        stop_now = True  # the signal ended the evaluation's data workers
                    else:
                        writer.write(step, val_metrics)
                        train_log.restart_clock(step)  # evaluation time is not training throughput
                        early_stopping.update(step, val_metrics)
                if step % checkpoint_every == 0 or step == end_step or stop_now or eval_metrics:
                    save(step, data_state, eval_metrics)
                if stop_now:
                    raise preemption.Preempted(step, signals.received)
                if early_stopping.should_stop():
                    print(early_stopping.message(step), file=sys.stderr)
                    status = "early_stopped"
                    break
            else:
                status = "done" if end_step == total_steps else "stopped"
        if not val_metrics and end_step == total_steps:
            val_metrics = evaluate()
    finally:
        checkpointer.close()
    if status != "stopped":
        _write_result(workdir, status, step=end_step if status == "done" else step, val_metrics=val_metrics,
                      best=early_stopping.state())
    if jax.process_index() == 0:
        plots.plot_training_curves(workdir)  # workdir/plots/{loss,accuracy,lr}.png
    return val_metrics


def _write_result(workdir: str, status: str, **fields) -> None:
    """`workdir/result.json`: written once a run has finished, for sweeps and scripts to read."""
    if jax.process_index() == 0:
        record = {"status": status, **{k: _jsonable(v) for k, v in fields.items()}}
        with open(os.path.join(workdir, "result.json"), "w") as f:
            json.dump(record, f, indent=2)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return float(value) if hasattr(value, "dtype") else value


class EarlyStopping:
    """Tracks the best value of `config.best_metric`; asks to stop after `early_stopping_patience`
    evaluations without improvement (0: never). Its state travels in the checkpoint's meta."""

    def __init__(self, config: ml_collections.ConfigDict, saved: dict | None):
        if config.best_mode not in ("max", "min"):
            raise config_lib.ConfigError(f"config.best_mode={config.best_mode!r}: use 'max' or 'min'")
        self._metric, self._mode = config.best_metric, config.best_mode
        self._patience = config.early_stopping_patience
        saved = saved or {"best_step": None, "best_value": None, "evals_since_best": 0}
        self.best_step, self.best_value = saved["best_step"], saved["best_value"]
        self.evals_since_best = saved["evals_since_best"]

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if self._metric not in metrics:
            raise config_lib.ConfigError(
                f"config.best_metric={self._metric!r} is not an evaluation metric; choose one of {sorted(metrics)}"
            )
        value = float(metrics[self._metric])
        better = self.best_value is None or (value > self.best_value if self._mode == "max" else value < self.best_value)
        if better:
            self.best_step, self.best_value, self.evals_since_best = step, value, 0
        else:
            self.evals_since_best += 1

    def should_stop(self) -> bool:
        return bool(self._patience) and self.evals_since_best >= self._patience

    def message(self, step: int) -> str:
        return (
            f"Early stopping at step {step}: {self._metric} has not improved for {self.evals_since_best} "
            f"evaluations; best {self.best_value:.4g} at step {self.best_step} (its checkpoint is kept)"
        )

    def state(self) -> dict:
        return {"best_step": self.best_step, "best_value": self.best_value, "evals_since_best": self.evals_since_best}


def _resumed_num_workers(meta: dict, configured: int) -> int:
    """The worker count of the checkpoint (grain resumes only with the same count)."""
    saved = meta["num_workers"]
    if configured >= 0 and configured != saved:
        raise config_lib.ConfigError(
            f"config.data.num_workers={configured} but the checkpoint was written with {saved} workers; "
            f"grain resumes only with the same count: use --config.data.num_workers={saved} (or -1)"
        )
    return saved


class TrainLog:
    """Per-step train metrics kept on the device and written as window means at log steps.

    Reading them back is the loop's only host sync. A non-finite loss stops the run (or, with
    `nonfinite_loss="skip"`, is counted in `train/skipped_steps`: the step made no update and did
    not advance the LR schedule).
    Unreadable images the loaders replaced (config.data.bad_images="skip"), summed over processes
    at each flush (which every process calls at the same steps), are counted in
    `data/skipped_images`.
    """

    def __init__(self, writer, schedule, batch_size: int, steps_per_epoch: int, nonfinite_loss: str, step: int,
                 skipped: dict):
        """`skipped`: the counts a resumed run's checkpoint holds (`skipped()`), else {}."""
        self._writer, self._schedule = writer, schedule
        self._batch_size, self._steps_per_epoch = batch_size, steps_per_epoch
        self._nonfinite_loss = nonfinite_loss
        self._pending: list[dict] = []
        self._skipped = skipped.get("steps", 0)
        self._skipped_images = skipped.get("images", 0)
        self.restart_clock(step)

    def skipped(self) -> dict:
        """The run's counts so far of skipped steps and skipped images, for the checkpoint."""
        return {"steps": self._skipped, "images": self._skipped_images}

    def add(self, metrics: dict) -> None:
        self._pending.append(metrics)

    def restart_clock(self, step: int) -> None:
        self._clock, self._clock_step = time.perf_counter(), step

    @jax.transfer_guard_device_to_host("allow")
    def flush(self, step: int) -> None:
        """Write the mean of the metrics since the last flush; raise NonFiniteLoss in "stop" mode."""
        if not self._pending:
            return
        fetched = jax.device_get(self._pending)
        per_step = {k: np.asarray([m[k] for m in fetched]) for k in fetched[0]}
        first_step = step - len(fetched) + 1
        self._pending.clear()
        bad = ~np.isfinite(per_step["loss"])
        if bad.any() and self._nonfinite_loss == "stop":
            raise NonFiniteLoss(
                f"the training loss became {per_step['loss'][bad.argmax()]} at step {first_step + bad.argmax()}; "
                "the last checkpoint before it is kept. Try a lower config.optim.lr, more warmup "
                "(config.optim.warmup_epochs), config.dtype='float32', or config.nonfinite_loss='skip'"
            )
        self._skipped += int(per_step.pop("skipped").sum())
        window_skipped_images = int(per_step.pop("skipped_images").sum())
        if jax.process_count() > 1:  # each process counted what its own loader replaced
            window_skipped_images = int(multihost_utils.process_allgather(np.int32(window_skipped_images)).sum())
        self._skipped_images += window_skipped_images
        good = ~bad
        scalars = {f"train/{k}": float(np.mean(v[good])) if good.any() else float("nan") for k, v in per_step.items()}
        now = time.perf_counter()
        scalars["train/images_per_sec"] = (step - self._clock_step) * self._batch_size / (now - self._clock)
        # A skipped step keeps the previous optimizer state, schedule count included: the count is
        # the number of steps that updated, and the latest update used schedule(count - 1).
        scalars["train/lr"] = float(self._schedule(max(step - 1 - self._skipped, 0)))
        scalars["train/skipped_steps"] = self._skipped
        scalars["data/skipped_images"] = self._skipped_images
        scalars["epoch"] = step / self._steps_per_epoch
        self._writer.write(step, scalars)
        self.restart_clock(step)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or Inf (config.nonfinite_loss="stop")."""


def _prefetch_to_mesh(iterator, mesh) -> Iterator[tuple[dict, bytes, int]]:
    """Yield (global batch on the mesh, iterator state just after it, unreadable images this process
    replaced in it), copying ahead of use.

    The state travels with its batch so a checkpoint records the position of the last batch the
    model consumed, not of the batches already prefetched.
    """
    queue = collections.deque()
    while True:
        while len(queue) < PREFETCH_BATCHES:
            batch = next(iterator)
            skipped_images = int(batch.pop("skipped").sum())
            queue.append((sharding.shard_batch(batch, mesh), iterator.get_state(), skipped_images))
        yield queue.popleft()


def _prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Create `workdir` and write config.json now, so an unwritable workdir fails before training."""
    try:
        os.makedirs(workdir, exist_ok=True)
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=2))
    except OSError as e:
        raise config_lib.ConfigError(f"--workdir {workdir!r} is not writable: {e}") from None


def _check_num_classes(config: ml_collections.ConfigDict, splits: dict, workdir: str) -> int:
    """The number of classes, checked against the config and against an earlier run in `workdir`
    (workdir/classes.json, which also records the class counts of every split)."""
    class_names = list(splits["train"].class_names)
    if config.num_classes and config.num_classes != len(class_names):
        raise config_lib.ConfigError(
            f"config.num_classes={config.num_classes} but {config.data.root} has {len(class_names)} classes; "
            "set --config.num_classes=0 to take the number from the data"
        )
    data_classes.write_or_check(workdir, splits, write=jax.process_index() == 0)
    print(data_classes.describe_counts(splits), file=sys.stderr)
    return len(class_names)


def _read_model_init(config: ml_collections.ConfigDict) -> tuple[dict, weights.Pretrained] | None:
    """The weights `config.model_init` names; fills in what they imply and the config leaves open:
    data.mean/std (else ImageNet's) and model options such as a ViT's LayerNorm epsilon."""
    pretrained = None
    if config.model_init:
        try:
            pretrained = weights.load(config.model_init, config.model_name)
        except weights.WeightsError as e:
            raise config_lib.ConfigError(f"config.model_init={config.model_init!r}: {e}") from None
        info = pretrained[1]
        with config.unlocked():
            for key, value in info.model_options.items():
                if key not in config.model:
                    config.model[key] = value
    preprocessing = pretrained[1].preprocessing if pretrained else weights.IMAGENET
    for key in ("mean", "std"):
        if not config.data[key]:
            config.data[key] = tuple(preprocessing[key])
    return pretrained


def _load_model_init(model: nnx.Module, params: dict, config: ml_collections.ConfigDict) -> None:
    try:
        notes = weights.apply(model, params, dont_load=tuple(config.model_init_dont_load),
                              pos_interpolation=config.model_init_pos_interpolation)
    except weights.WeightsError as e:
        raise config_lib.ConfigError(f"config.model_init={config.model_init!r}: {e}") from None
    print(f"Loaded {config.model_init}" + "".join(f"\n  {note}" for note in notes), file=sys.stderr)


def _track_ema_as_best(config: ml_collections.ConfigDict) -> None:
    """With an EMA of the weights, choose the best checkpoint (and stop early) by the EMA's metrics:
    the EMA weights are what evaluate, predict and export load by default (as timm's train.py)."""
    if config.ema_decay > 0 and config.best_metric.startswith("val/"):
        ema_metric = "val_ema/" + config.best_metric.removeprefix("val/")
        print(f"config.best_metric: {config.best_metric} -> {ema_metric} (an EMA is kept; its weights are "
              "the ones evaluated and exported by default)", file=sys.stderr)
        config.best_metric = ema_metric


def compute_dtype(name: str) -> str:
    """config.dtype with "auto" resolved for this machine: bfloat16 on accelerators, float32 on CPUs."""
    if name == "auto":
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return name


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> nnx.Module:
    """The model `config` names, with a `num_classes`-way head, in `config.dtype`."""
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(compute_dtype(config.dtype))
    if dtype is None:
        raise config_lib.ConfigError(f"config.dtype={config.dtype!r}: use 'auto', 'float32' or 'bfloat16'")
    try:
        return models.create(
            config.model_name, num_classes=num_classes, rngs=nnx.Rngs(config.seed), dtype=dtype, **config.model
        )
    except (ValueError, TypeError) as e:
        raise config_lib.ConfigError(f"config.model_name / config.model: {e}") from None


def parse_args(argv: list[str]) -> tuple[ml_collections.ConfigDict, str]:
    """Parse `--config FILE[:ARG] --workdir DIR --config.a.b=VALUE ...` into (config, workdir), and join
    the other processes of a multi-process run."""
    parser = argparse.ArgumentParser(prog="python -m jaxclf.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="config file, optionally FILE:ARG for get_config(ARG)")
    parser.add_argument("--workdir", required=True, help="where checkpoints, metrics and config.json go")
    multi = parser.add_argument_group("multi-process runs (SLURM's srun needs none of these)")
    multi.add_argument("--coordinator_address", help="HOST:PORT of process 0")
    multi.add_argument("--num_processes", type=int)
    multi.add_argument("--process_id", type=int)
    args, rest = parser.parse_known_args(argv)
    overrides = []
    rest = list(rest)
    while rest:
        item = rest.pop(0)
        if not item.startswith("--config."):
            parser.error(f"unrecognised argument {item!r}")
        if "=" not in item and rest:
            item = f"{item}={rest.pop(0)}"
        overrides.append(item[len("--config.") :])
    config = config_lib.load_config(args.config, overrides)
    try:
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    except ValueError as e:
        parser.error(str(e))
    return config, args.workdir


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 a mistake in the config, data or checkpoint (message on stderr),
    75 (`EXIT_PREEMPTED`) stopped by a signal after checkpointing, 3 the loss became NaN/Inf."""
    try:
        config, workdir = parse_args(sys.argv[1:] if argv is None else argv)
        train_and_evaluate(config, workdir)
    except (config_lib.ConfigError, sources.DataError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except preemption.Preempted as e:
        print(str(e), file=sys.stderr)
        return preemption.EXIT_PREEMPTED
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
