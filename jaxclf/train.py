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

from jaxclf import checkpoint, config as config_lib, models, optim, sharding, steps
from jaxclf.data import digits, pipeline, sources
from jaxclf.metrics import MetricsWriter

# Data sets that jaxclf can write to `config.data.root` itself (`config.data.prepare`).
PREPARERS = {"sklearn_digits": digits.write_digits_folder}

PREFETCH_BATCHES = 2


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    devices: list[jax.Device] | None = None,
    stop_at_step: int | None = None,
) -> dict[str, float]:
    """Run (or resume) training in `workdir`; return the last validation metrics.

    `stop_at_step` ends the run early after checkpointing there, as a preempted job would;
    `devices` restricts the mesh (tests compare 1 and 8 devices).
    """
    _prepare_workdir(config, workdir)
    splits = _load_data(config)
    train_set, val_set = splits["train"], splits["val"]
    num_classes = _check_num_classes(config, train_set, workdir)

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

    model = _create_model(config, num_classes)
    tx, schedule = optim.make_optimizer(config.optim, total_steps, steps_per_epoch)
    train_graphdef, eval_graphdef, state = steps.create_train_state(model, tx)
    state = jax.device_put(state, sharding.replicated(mesh))
    normalization = dict(mean=tuple(config.data.mean), std=tuple(config.data.std))
    train_step = steps.make_train_step(
        train_graphdef, tx, mesh, label_smoothing=config.label_smoothing, **normalization
    )
    eval_step = steps.make_eval_step(eval_graphdef, mesh, **normalization)

    loader = pipeline.make_train_loader(
        train_set,
        config.data.pp_train,
        global_batch_size=config.batch_size,
        seed=config.seed,
        num_workers=config.data.num_workers,
    )
    train_iter = iter(loader)

    # Decide how to initialise. The order matters:
    # 1. Resume from the latest checkpoint in workdir (a preempted or restarted job).
    # 2. Otherwise start from the freshly initialised model.
    checkpointer = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
    start_step = checkpointer.latest_step() or 0
    if start_step:
        state = checkpointer.restore(start_step, state, train_iter)
        print(f"Resumed from {checkpointer.directory} at step {start_step}", file=sys.stderr)

    def evaluate() -> dict[str, float]:
        totals = steps.zero_eval_totals(mesh)
        for batch in pipeline.eval_batches(
            val_set, config.data.pp_eval, global_batch_size=eval_batch_size, num_workers=config.data.num_workers
        ):
            totals = eval_step(state, sharding.shard_batch(batch, mesh), totals)
        totals = jax.device_get(totals)
        count = totals["count"]
        return {
            "val/loss": totals["loss"] / count,
            "val/accuracy": totals["top1"] / count,
            "val/top5": totals["top5"] / count,
            "val/examples": count,
        }

    writer = MetricsWriter(workdir)
    end_step = total_steps if stop_at_step is None else min(stop_at_step, total_steps)
    pending_metrics: list[dict] = []
    val_metrics: dict[str, float] = {}
    last_log_time, last_log_step = time.perf_counter(), start_step
    data_state = None
    for step, (batch, data_state) in zip(
        range(start_step + 1, end_step + 1), _prefetch_to_mesh(train_iter, mesh), strict=False
    ):
        state, metrics = train_step(state, batch)
        pending_metrics.append(metrics)  # stays on the device until the next log line

        if step % config.log_every_steps == 0 or step == end_step:
            means = {f"train/{k}": float(np.mean(v)) for k, v in _stack(pending_metrics).items()}
            pending_metrics.clear()
            now = time.perf_counter()
            means["train/images_per_sec"] = (step - last_log_step) * config.batch_size / (now - last_log_time)
            means["train/lr"] = float(schedule(step - 1))
            means["epoch"] = step / steps_per_epoch
            writer.write(step, means)
            last_log_time, last_log_step = now, step

        if step % eval_every == 0 or step == total_steps:
            val_metrics = evaluate()
            writer.write(step, val_metrics)
            # Evaluation time is not training throughput: restart the clock.
            last_log_time, last_log_step = time.perf_counter(), step
        if step % eval_every == 0 or step == end_step:
            checkpointer.save(step, state, checkpoint.IteratorState(data_state))

    if not val_metrics:
        val_metrics = evaluate()
    checkpointer.close()
    return val_metrics


def _prefetch_to_mesh(iterator, mesh) -> Iterator[tuple[dict, bytes]]:
    """Yield (global batch on the mesh, iterator state just after it), copying ahead of use.

    The state travels with its batch so a checkpoint records the position of the last batch the
    model consumed, not of the batches already prefetched.
    """
    queue = collections.deque()
    while True:
        while len(queue) < PREFETCH_BATCHES:
            batch = next(iterator)
            queue.append((sharding.shard_batch(batch, mesh), iterator.get_state()))
        yield queue.popleft()


def _stack(metrics: list[dict]) -> dict[str, np.ndarray]:
    fetched = jax.device_get(metrics)
    return {k: np.asarray([m[k] for m in fetched]) for k in fetched[0]}


def _prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Create `workdir` and write config.json now, so an unwritable workdir fails before training."""
    try:
        os.makedirs(workdir, exist_ok=True)
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=2))
    except OSError as e:
        raise config_lib.ConfigError(f"--workdir {workdir!r} is not writable: {e}") from None


def _load_data(config: ml_collections.ConfigDict) -> dict[str, sources.ImageFolder]:
    data = config.data
    if not data.root:
        raise config_lib.ConfigError(
            "config.data.root is not set: point it at a folder holding train/<class>/* images "
            "(and val/<class>/* or --config.data.val_fraction=0.1), e.g. --config.data.root=/data/pets"
        )
    root = os.path.expanduser(data.root)
    if data.prepare:
        if data.prepare not in PREPARERS:
            raise config_lib.ConfigError(
                f"config.data.prepare={data.prepare!r} is unknown; known: {sorted(PREPARERS)}"
            )
        PREPARERS[data.prepare](root)
    return sources.load_image_folder_splits(
        root,
        train_split=data.train_split,
        val_split=data.val_split,
        val_fraction=data.val_fraction,
        split_seed=data.split_seed,
    )


def _check_num_classes(config: ml_collections.ConfigDict, train_set: sources.ImageFolder, workdir: str) -> int:
    """The number of classes, checked against the config and against an earlier run in `workdir`."""
    class_names = list(train_set.class_names)
    if config.num_classes and config.num_classes != len(class_names):
        raise config_lib.ConfigError(
            f"config.num_classes={config.num_classes} but {config.data.root} has {len(class_names)} classes; "
            "set --config.num_classes=0 to take the number from the data"
        )
    path = os.path.join(workdir, "classes.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)["class_names"]
        if saved != class_names:
            raise config_lib.ConfigError(
                f"the classes in {config.data.root} differ from those {path} records for this workdir; "
                "use a new --workdir or the original data"
            )
    elif jax.process_index() == 0:
        with open(path, "w") as f:
            json.dump({"class_names": class_names, "train_counts": train_set.class_counts()}, f, indent=2)
    print(f"{len(class_names)} classes, train counts: {train_set.class_counts()}", file=sys.stderr)
    return len(class_names)


def _create_model(config: ml_collections.ConfigDict, num_classes: int) -> nnx.Module:
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(config.dtype)
    if dtype is None:
        raise config_lib.ConfigError(f"config.dtype={config.dtype!r}: use 'float32' or 'bfloat16'")
    try:
        return models.create(
            config.model_name, num_classes=num_classes, rngs=nnx.Rngs(config.seed), dtype=dtype, **config.model
        )
    except (ValueError, TypeError) as e:
        raise config_lib.ConfigError(f"config.model_name / config.model: {e}") from None


def parse_args(argv: list[str]) -> tuple[ml_collections.ConfigDict, str]:
    """Parse `--config FILE[:ARG] --workdir DIR --config.a.b=VALUE ...` into (config, workdir)."""
    parser = argparse.ArgumentParser(prog="python -m jaxclf.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="config file, optionally FILE:ARG for get_config(ARG)")
    parser.add_argument("--workdir", required=True, help="where checkpoints, metrics and config.json go")
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
    return config_lib.load_config(args.config, overrides), args.workdir


def main(argv: list[str] | None = None) -> int:
    try:
        config, workdir = parse_args(sys.argv[1:] if argv is None else argv)
        train_and_evaluate(config, workdir)
    except (config_lib.ConfigError, sources.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
