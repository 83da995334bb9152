"""Train a classifier: `python -m jaxclf.train --config configs/NAME.py [--workdir DIR] [--config.a.b=VALUE ...]`.

`--dry_run [--memory_gb N]` compiles the step and prints what it needs per device instead (`dry_run`).

Reads top to bottom: resolve the config -> build (data, model, optimizer, steps) -> restore or
init -> loop (train, log, evaluate, checkpoint). A workdir that already holds a checkpoint is resumed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence

import jax
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxclf import config as config_lib, data as data_lib, models, weights
from jaxclf.models import peft
from jaxclf.data import check as data_check, classes as data_classes, imbalance, pipeline, sources
from jaxclf.evaluation import base as eval_base, registry as eval_registry
from jaxclf.runs import checkpoint
from jaxclf.tasks import base as task_base, registry as task_registry
from jaxclf.tracking import plots, progress as progress_lib, trackers as trackers_lib
from jaxclf.tracking.metrics import MetricsWriter
from jaxclf.training import (
    distributed,
    listeners as listeners_lib,
    loop as loop_lib,
    memory,
    optim,
    preemption,
    profiling,
    pruning,
    resolve as resolve_lib,
    sharding,
    steps,
)

NonFiniteLoss = loop_lib.NonFiniteLoss
EXIT_PRUNED = 4  # see main()


@dataclasses.dataclass
class Built:
    """What a resolved config builds: data, the model's initial train state, the jitted steps, loaders, checkpointer."""

    config: ml_collections.FrozenConfigDict
    mesh: Mesh
    train_set: sources.Source
    total_steps: int
    steps_per_epoch: int
    state: steps.TrainState
    train_step: Callable
    evaluations: eval_base.Evaluations
    schedule: optax.Schedule
    make_train_iterator: Callable[[int], object]
    checkpointer: checkpoint.Checkpointer


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    devices: list[jax.Device] | None = None,
    stop_at_step: int | None = None,
    listeners: Sequence[listeners_lib.EvalListener] = (),
) -> dict[str, float]:
    """Run (or resume) training in `workdir`; return the last validation metrics.

    Raises `Preempted` after checkpointing when a stop signal arrives. `stop_at_step` ends the
    run early after checkpointing there (tests use it); `devices` restricts the mesh; `listeners`
    are told every evaluation after the built-in ones (metrics, early stopping) and may stop the run.
    """
    mesh = sharding.make_mesh(devices)
    resolved = resolve_lib.resolve(config, mesh.devices.flat[0].platform, task_registry.check_config)
    for note in resolved.notes:
        print(note, file=sys.stderr)
    config = resolved.config
    _prepare_workdir(config, workdir)
    trackers_lib.check(config)  # a tracker's missing library fails now, not after building
    built = build(config, resolved.pretrained, workdir, mesh)
    tracked = trackers_lib.start(config, workdir, params=config.to_dict())
    error = None
    try:
        return _train(built, workdir, stop_at_step, listeners, tracked)
    except BaseException as e:
        error = e
        raise
    finally:
        tracked.close(error, interrupted=isinstance(error, preemption.Preempted))
        built.evaluations.close()  # their loaders' workers, now: at exit they would leave shared memory behind
        pipeline.finish_shared_memory_unlinks()
        built.checkpointer.close()


def dry_run(config: ml_collections.ConfigDict, memory_gb: float | None = None, *,
            devices: list[jax.Device] | None = None) -> tuple[memory.StepMemory, memory.BatchFit | None]:
    """Compile the train step of `config` for its mesh (`devices`, default all) with abstract inputs, print what
    it needs per device (`memory.report`) and, given `memory_gb`, the largest batch that fits; train nothing.

    The config is resolved as for training (reading `model_init` for the options it implies) and the data's
    class lists are read (no image); the model and state are shapes only and nothing is written to a workdir.
    """
    mesh = sharding.make_mesh(devices)
    resolved = resolve_lib.resolve(config, mesh.devices.flat[0].platform, task_registry.check_config)
    for note in resolved.notes:
        print(note, file=sys.stderr)
    config = resolved.config
    run_tasks = task_registry.for_run(config, resolved.pretrained[1] if resolved.pretrained else None)
    splits = data_lib.load_splits(config.data)
    with tempfile.TemporaryDirectory(prefix="jaxclf_dry_run_") as scratch:  # what the class checks and tasks write
        data = _training_data(config, run_tasks, splits, scratch, mesh)
    program = _train_program(config, resolved.pretrained, run_tasks, data, mesh, abstract=True)
    image_shape = pipeline.image_shape(config.data.pp_train)

    def measure_at(batch_size: int) -> memory.StepMemory:
        with progress_lib.phase(f"compiling the train step at batch {batch_size}"):
            return memory.measure(program.train_step, program.state, program.state_sharding,
                                  memory.abstract_batch(batch_size, image_shape, mesh))

    step = measure_at(config.batch_size)
    fit = None
    if memory_gb is not None:
        multiple = mesh.size * config.optim.accumulate_steps  # every micro-batch splits evenly over the devices
        try:
            fit = memory.largest_batch(measure_at, step, round(memory_gb * memory.GIB), multiple)
        except ValueError as e:
            raise config_lib.ConfigError(f"--memory_gb: {e}") from None
    print(memory.report(step, mesh.size, fit))
    return step, fit


def build(config: ml_collections.FrozenConfigDict, pretrained: tuple[dict, weights.Pretrained] | None, workdir: str,
          mesh: Mesh) -> Built:
    """Data, model (with `pretrained` loaded), optimizer, sharded train state, jitted steps and evaluators for a
    resolved config, with every hook of the run's tasks (`jaxclf.tasks`) folded in, in the order they document."""
    profiling.check(config.profile_steps)  # a mistake fails now, not at the profiled step
    run_tasks = task_registry.for_run(config, pretrained[1] if pretrained else None)
    with progress_lib.phase(f"reading the data ({config.data.source} {config.data.tfds_name or config.data.root})"):
        splits = data_lib.load_splits(config.data)
    data_check.before_training(config.data, splits, workdir)  # config.data.check: fails now, not hours in
    data = _training_data(config, run_tasks, splits, workdir, mesh)
    program = _train_program(config, pretrained, run_tasks, data, mesh)
    class_groups = {name: ids for task in run_tasks for name, ids in task.eval_groups().items()}
    context = eval_base.EvalContext(config, mesh, program.eval_graphdef, program.state_sharding, data.splits,
                                    class_groups, data.steps_per_epoch)
    evaluations = eval_base.Evaluations(eval_registry.build(context), data.total_steps,
                                        derive=lambda metrics: task_base.fold(run_tasks, "eval_metrics", metrics))
    evaluations.check_metric(config.best_metric, "config.best_metric")
    replay, train_set = data.replay, data.train_set

    def make_train_iterator(num_workers: int):
        return iter(pipeline.make_train_loader(
            train_set, config.data.pp_train, global_batch_size=config.batch_size, seed=config.seed,
            num_workers=num_workers, sampling=config.data.sampling, bad_images=config.data.bad_images,
            replay=replay.source if replay else None, replay_rows=replay.rows if replay else 0,
            max_image_pixels=config.data.max_image_pixels,
        ))

    checkpointer = checkpoint.Checkpointer(
        workdir, keep=config.keep_checkpoints, best_metric=config.best_metric, best_mode=config.best_mode
    )
    return Built(
        config=config, mesh=mesh, train_set=train_set, total_steps=data.total_steps,
        steps_per_epoch=data.steps_per_epoch, state=jax.device_put(program.state, program.state_sharding),
        train_step=program.train_step, evaluations=evaluations, schedule=program.schedule,
        make_train_iterator=make_train_iterator, checkpointer=checkpointer,
    )


@dataclasses.dataclass
class TrainingData:
    """The run's splits after its tasks' hooks, the number of classes, the replay stream and the step counts."""

    splits: dict[str, sources.Source]
    train_set: sources.Source
    num_classes: int
    replay: task_base.Replay | None
    steps_per_epoch: int
    total_steps: int


def _training_data(config: ml_collections.FrozenConfigDict, run_tasks: Sequence[task_base.Task], splits: dict,
                   workdir: str, mesh: Mesh) -> TrainingData:
    splits = task_base.fold(run_tasks, "splits", splits, workdir)
    train_set = splits["train"]
    num_classes = _check_num_classes(config, splits, workdir)
    sharding.check_batch_size(config.batch_size, mesh, "batch_size")
    sharding.check_batch_size(config.eval_batch_size or config.batch_size, mesh, "eval_batch_size")
    replay = _replay(run_tasks)
    steps_per_epoch = len(train_set) // (config.batch_size - (replay.rows if replay else 0))  # a pass over the data
    if steps_per_epoch == 0:
        raise config_lib.ConfigError(
            f"config.batch_size={config.batch_size} is larger than the {len(train_set)} training images"
        )
    total_steps = config.total_steps or math.ceil(config.num_epochs * steps_per_epoch)
    return TrainingData(splits, train_set, num_classes, replay, steps_per_epoch, total_steps)


@dataclasses.dataclass
class TrainProgram:
    """The model's graphdefs, its initial train state and layout, and the jitted train step over the mesh."""

    eval_graphdef: nnx.GraphDef
    state: steps.TrainState  # ShapeDtypeStructs where built `abstract`
    state_sharding: object
    train_step: Callable
    schedule: optax.Schedule


def _train_program(config: ml_collections.FrozenConfigDict, pretrained: tuple[dict, weights.Pretrained] | None,
                   run_tasks: Sequence[task_base.Task], data: TrainingData, mesh: Mesh, *,
                   abstract: bool = False) -> TrainProgram:
    """Model (with `pretrained` loaded, PEFT applied), optimizer, state and train step. `abstract`: the model
    and state as shapes only (`nnx.eval_shape`; no initialisation, no weights), for compiling ahead."""

    def adapted_model() -> models.Classifier:
        model = _create_model(config, data.num_classes)
        if pretrained and not abstract:  # loading weights changes no shape: an abstract model skips them
            _load_model_init(model, task_base.fold(run_tasks, "init_params", pretrained[0], model), config)
        _apply_peft(model, config)
        return model

    model = nnx.eval_shape(adapted_model) if abstract else adapted_model()
    try:
        tx, schedule = optim.make_optimizer(config.optim, model, data.total_steps, data.steps_per_epoch)
        tx = pruning.with_pruning(tx, config, model, data.total_steps)
    except (optim.OptimConfigError, pruning.PruneConfigError) as e:
        raise config_lib.ConfigError(str(e)) from None
    train_graphdef, eval_graphdef, state = steps.create_train_state(
        model, tx, ema=config.ema_decay > 0, freeze_bn_stats=config.freeze_bn_stats, abstract=abstract
    )
    try:
        state_sharding = sharding.state_sharding(state, mesh, config.param_sharding)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None
    counts = task_base.fold(run_tasks, "class_counts", list(data.train_set.class_counts().values()))
    loss = task_base.fold(run_tasks, "loss", steps.Loss(terms=(), class_weights=imbalance.class_weights(
        config.data.class_weights, counts)), tuple(data.train_set.class_names))
    train_step = steps.make_train_step(train_graphdef, tx, mesh, config, data.num_classes, state_sharding, loss,
                                       compiler_options=steps.train_compiler_options(model),
                                       frozen_params=optim.frozen_mask(config.optim, model))
    return TrainProgram(eval_graphdef, state, state_sharding, train_step, schedule)


def _replay(run_tasks: Sequence[task_base.Task]) -> task_base.Replay | None:
    """The one replay stream the run's tasks ask for, if any."""
    replays = [(task.name, replay) for task in run_tasks if (replay := task.replay()) is not None]
    if len(replays) > 1:
        raise config_lib.ConfigError(f"tasks {[name for name, _ in replays]} each replay data into every batch; "
                                     "a run takes one replay stream")
    return replays[0][1] if replays else None


def _train(built: Built, workdir: str, stop_at_step: int | None, listeners: Sequence,
           tracked: trackers_lib.TrackedRun) -> dict[str, float]:
    """Restore or initialise, then loop (every logged scalar also goes to `tracked`); returns the last
    validation metrics."""
    config = built.config
    # Decide how to initialise. The order matters:
    # 1. Resume from the newest readable checkpoint in workdir (a preempted or restarted job).
    # 2. Otherwise start from the freshly built model (with config.model_init's weights, if any).
    restored = built.checkpointer.restore_latest(
        built.state, lambda meta: built.make_train_iterator(_resumed_num_workers(meta, config.data.num_workers))
    )
    if restored:
        start_step, state, train_iter, meta = restored
        print(f"Resumed from {built.checkpointer.directory} at step {start_step}", file=sys.stderr)
    else:
        meta = {"num_workers": pipeline.resolve_num_workers(config.data.num_workers)}
        start_step, state, train_iter = 0, built.state, built.make_train_iterator(meta["num_workers"])
    writer = MetricsWriter(workdir, sinks=[tracked])
    early_stopping = listeners_lib.EarlyStopping(config, meta.get(listeners_lib.EarlyStopping.state_key))
    end_step = built.total_steps if stop_at_step is None else min(stop_at_step, built.total_steps)
    progress = progress_lib.TrainProgress(built.total_steps, start_step, config.batch_size)
    train_log = loop_lib.TrainLog(writer, built.schedule, config.batch_size, built.steps_per_epoch,
                                  config.nonfinite_loss, start_step, meta.get("skipped", {}), progress)
    stop, step = None, start_step
    # On accelerators, any implicit device-to-host copy (a stray float(loss)) in the loop is an
    # error: the only host syncs are at logging, evaluation and checkpoint steps. (CPU arrays
    # already live in host memory, so the guard does not fire there.)
    profiler = profiling.StepProfiler(config.profile_steps, workdir)
    # The data workers are stopped when the loop ends, however it ends (done, early stop, pruned, preempted, error).
    with preemption.StopSignals() as signals, jax.transfer_guard_device_to_host("disallow"), \
            contextlib.closing(progress), contextlib.closing(profiler), pipeline.closing_iterator(train_iter):
        loop = loop_lib.TrainingLoop(
            train_iter=train_iter, mesh=built.mesh, evaluations=built.evaluations, checkpointer=built.checkpointer,
            train_log=train_log, listeners=[listeners_lib.WriteMetrics(writer), progress, early_stopping, *listeners],
            signals=signals, meta=meta, end_step=end_step, log_every=config.log_every_steps,
            checkpoint_every=config.checkpoint_every_steps or built.evaluations.every_steps, progress=progress,
        )
        with contextlib.closing(loop):
            for step in range(start_step + 1, end_step + 1):
                batch = loop.next_batch(step, state)
                with profiler.step(step):
                    state, metrics = built.train_step(state, batch)
                profiler.step_done(step, metrics)
                loop.log(step, metrics)
                stop = loop.evaluate(step, state)
                loop.save(step, state, stop)
                if stop:
                    print(stop.message, file=sys.stderr)
                    break
    val_metrics = loop.last_eval_metrics
    if not val_metrics and end_step == built.total_steps:
        val_metrics = built.evaluations(state)
    result = None
    if stop:
        result = _write_result(workdir, stop.status, step=step, val_metrics=val_metrics, best=early_stopping.state())
    elif end_step == built.total_steps:
        result = _write_result(workdir, "done", step=end_step, val_metrics=val_metrics, best=early_stopping.state())
    if jax.process_index() == 0:
        plot_paths = plots.plot_training_curves(workdir)  # workdir/plots/{loss,accuracy,lr}.png
        if result:
            files = [(os.path.join(workdir, name), "") for name in ("result.json", "config.json", "classes.json")]
            tracked.log_summary(step, {"result": result}, files + [(path, "plots") for path in plot_paths])
    return val_metrics


def _write_result(workdir: str, status: str, **fields) -> dict:
    """`workdir/result.json`: written once a run has finished, for sweeps and scripts to read; returns its record."""
    record = {"status": status, **{k: _jsonable(v) for k, v in fields.items()}}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "result.json"), "w") as f:
            json.dump(record, f, indent=2)
    return record


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return float(value) if hasattr(value, "dtype") else value


def _resumed_num_workers(meta: dict, configured: int) -> int:
    """The worker count of the checkpoint (grain resumes only with the same count)."""
    saved = meta["num_workers"]
    if configured >= 0 and configured != saved:
        raise config_lib.ConfigError(
            f"config.data.num_workers={configured} but the checkpoint was written with {saved} workers; "
            f"grain resumes only with the same count: use --config.data.num_workers={saved} (or -1)"
        )
    return saved


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


def _load_model_init(model: nnx.Module, params: dict, config: ml_collections.ConfigDict) -> None:
    try:
        notes = weights.apply(model, params, dont_load=tuple(config.model_init_dont_load),
                              pos_interpolation=config.model_init_pos_interpolation)
    except weights.WeightsError as e:
        raise config_lib.ConfigError(f"config.model_init={config.model_init!r}: {e}") from None
    print(f"Loaded {config.model_init}" + "".join(f"\n  {note}" for note in notes), file=sys.stderr)


def _apply_peft(model: models.Classifier, config: ml_collections.FrozenConfigDict) -> None:
    adapted = peft.from_config(model, config)
    if adapted:
        print(f"LoRA adapters (rank {config.peft.rank}) on {len(adapted)} layers", file=sys.stderr)


def _create_model(config: ml_collections.FrozenConfigDict, num_classes: int) -> models.Classifier:
    try:
        return models.create_model(config, num_classes)
    except (ValueError, TypeError) as e:
        raise config_lib.ConfigError(f"config.model_name / config.model: {e}") from None


def parse_args(argv: list[str]) -> tuple[ml_collections.ConfigDict, str, argparse.Namespace]:
    """Parse `--config FILE[:ARG] --workdir DIR --config.a.b=VALUE ... [--dry_run [--memory_gb N]]` into
    (config, workdir, the other flags), and join the other processes of a multi-process run."""
    parser = argparse.ArgumentParser(prog="python -m jaxclf.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="config file, optionally FILE:ARG for get_config(ARG)")
    parser.add_argument("--workdir", help="where checkpoints, metrics and config.json go (default: "
                        "runs/<config file name>[_<ARG>]); a workdir holding a checkpoint is resumed")
    parser.add_argument("--dry_run", action="store_true", help="compile the train step for the config's mesh, print "
                        "its memory per device and FLOPs, and exit without training or writing anything")
    parser.add_argument("--memory_gb", type=_memory_gib, help="with --dry_run: a device's memory in GiB; also print "
                        "the largest batch whose step fits it")
    multi = parser.add_argument_group("multi-process runs (SLURM's srun needs none of these)")
    multi.add_argument("--coordinator_address", help="HOST:PORT of process 0")
    multi.add_argument("--num_processes", type=int)
    multi.add_argument("--process_id", type=int)
    args, rest = parser.parse_known_args(argv)
    if args.memory_gb is not None and not args.dry_run:
        parser.error("--memory_gb sizes the batch of a --dry_run; add --dry_run")
    try:
        overrides = config_lib.parse_override_args(rest)
    except config_lib.ConfigError as e:
        parser.error(str(e))
    config = config_lib.load_config(args.config, overrides)
    try:
        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    except ValueError as e:
        parser.error(str(e))
    workdir = args.workdir or config_lib.default_workdir(args.config)
    if jax.process_index() == 0 and not args.dry_run:
        resuming = os.path.isdir(os.path.join(workdir, "checkpoints"))
        print(f"workdir: {workdir}{' (resuming)' if resuming else ''}", file=sys.stderr)
    return config, workdir, args


def _memory_gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of GiB per device (e.g. 80), got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 a mistake in the config, data or checkpoint (message on stderr),
    75 (`EXIT_PREEMPTED`) stopped by a signal after checkpointing, 3 the loss became NaN/Inf,
    4 (`EXIT_PRUNED`) a search trial stopped by its pruner (`python -m launch.trial`, which runs
    this training with the pruner as a listener; result.json says "pruned")."""
    def run():
        config, workdir, args = parse_args(sys.argv[1:] if argv is None else argv)
        return dry_run(config, args.memory_gb) if args.dry_run else train_and_evaluate(config, workdir)

    return exit_status(run)


def exit_status(run: Callable[[], object]) -> int:
    """Call `run` (which trains) and return how it ended as the exit status `main` documents."""
    try:
        run()
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
