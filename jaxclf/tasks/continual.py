"""Continual learning: continue a finished run with new classes and new data, without forgetting the old.

With `config.model_init` = a finished jaxclf workdir, `prepare` settles before the model is built:
- the classes: the old run's (its classes.json order) that the update still has examples of,
  then the new data's new classes; an old class that neither the new data nor the replay data has
  (nor LwF keeps) is an error naming it, unless `continual.drop_classes`;
- the data, labelled by that class list: the new training data; val and test are the new data's,
  plus the old run's own val/test images of old classes the new data does not evaluate;
- rehearsal: `continual.replay_fraction` of every batch from the replay data (`sampler.ReplaySampler`),
  capped at `continual.replay_per_class` exemplars per class, which are also written to
  `workdir/exemplars/` for the next update;
- the old model: its head rows go to the same classes by name (`fit_head`), it is the
  Learning-without-Forgetting teacher (`continual.distill_old`), and its accuracy on the old classes
  before the update is measured once, so every evaluation reports forgetting.
`workdir/continual.json` records the plan; `jaxclf.evaluate` reads it for its report.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import shutil
import sys
import tempfile
import zlib
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from jaxclf import config as config_lib, data as data_lib, models
from jaxclf.tasks import base, distill
from jaxclf.data import combine, sources
from jaxclf.runs import predictions
from jaxclf.training import steps
from jaxclf.weights import workdir as workdir_lib

FILE = "continual.json"
EXEMPLARS = "exemplars"
_EXEMPLARS_DONE = ".exemplars_complete.json"


@dataclasses.dataclass(frozen=True)
class ClassPlan:
    """The old run's classes and this run's: kept old classes in the old order, then the new ones."""

    old_names: tuple[str, ...]
    names: tuple[str, ...]
    dropped: tuple[str, ...] = ()

    @property
    def old_indices(self) -> np.ndarray:
        """This run's label of each kept old class (in the old order)."""
        return np.asarray([self.names.index(n) for n in self.old_names if n in self.names], np.int32)

    @property
    def old_columns(self) -> np.ndarray:
        """The old run's label of each kept old class."""
        return np.asarray([i for i, n in enumerate(self.old_names) if n in self.names], np.int32)

    @property
    def new_indices(self) -> np.ndarray:
        return np.asarray([i for i, n in enumerate(self.names) if n not in self.old_names], np.int32)

    def groups(self) -> dict[str, np.ndarray]:
        """{"old": ..., "new": ...} class ids of this run, the empty ones left out."""
        return {name: ids for name, ids in (("old", self.old_indices), ("new", self.new_indices)) if len(ids)}


def plan_classes(old_names: Sequence[str], data_names: Sequence[str], replay_names: Sequence[str], *,
                 lwf: bool, drop_classes: bool, old_run: str) -> tuple[ClassPlan, list[str]]:
    """The class plan, and notes: an old class is kept if the new data, the replay data or LwF has it."""
    old_names, data_names = tuple(old_names), tuple(data_names)
    unknown = sorted(set(replay_names) - set(old_names) - set(data_names))
    if unknown:
        raise config_lib.ConfigError(
            f"config.continual.replay has classes {unknown[:5]} that are neither classes of {old_run} nor of the "
            "new data; the replay data holds examples of old classes"
        )
    covered = set(data_names) | set(replay_names) | (set(old_names) if lwf else set())
    missing = [n for n in old_names if n not in covered]
    new = [n for n in data_names if n not in old_names]
    renamed = {m: close[0] for m in missing if (close := difflib.get_close_matches(m, new, n=1, cutoff=0.6))}
    notes = []
    for name in new:
        close = difflib.get_close_matches(name, old_names, n=1, cutoff=0.6)
        if close and close[0] not in missing:
            notes.append(f"new class {name!r} resembles the old class {close[0]!r}: classes are matched by name, so "
                         "they stay two classes (rename the folder to the old name if they are one)")
    if missing and not drop_classes:
        hint = "; ".join(f"was {m!r} renamed to {r!r}? classes are matched by name" for m, r in renamed.items())
        raise config_lib.ConfigError(
            f"classes {missing[:10]} of {old_run} have no examples in the new data nor in the replay data "
            f"(config.continual.replay){': ' + hint if hint else ''}. Give their examples (new data, or "
            "--config.continual.replay=PATH), keep them by LwF (--config.continual.distill_old=1), or drop them "
            "from the model with --config.continual.drop_classes=True"
        )
    if missing:
        notes.append(f"dropped {len(missing)} old classes (continual.drop_classes): {missing[:10]}"
                     + "".join(f"; {m!r} renamed to {r!r}?" for m, r in renamed.items()))
    names = tuple(n for n in old_names if n in covered) + tuple(new)
    return ClassPlan(old_names, names, tuple(missing)), notes


def check_config(config: ml_collections.ConfigDict, info) -> list[str]:
    """Check `config.continual` against `model_init`'s weights `info` and, for a finished run with
    continual.keep_preprocessing, take its preprocessing over (in place); returns notes."""
    spec = config.continual
    if getattr(info, "source_format", "") != "jaxclf_workdir":
        defaults = config_lib.base_config().continual
        changed = sorted(k for k in spec.keys() if spec[k] != defaults[k])
        if changed:
            raise config_lib.ConfigError(
                f"config.continual.{changed[0]} is set, but config.model_init={config.model_init!r} is not a "
                "finished jaxclf workdir (DIR[:best|last|STEP]) to continue"
            )
        return []
    if not 0 <= spec.replay_fraction < 1:
        raise config_lib.ConfigError(f"config.continual.replay_fraction={spec.replay_fraction}: use a value in [0, 1)")
    if spec.replay_per_class < 0 or spec.distill_old < 0 or not spec.temperature > 0:
        raise config_lib.ConfigError("config.continual.replay_per_class and distill_old must be >= 0, temperature > 0")
    notes = []
    if spec.keep_preprocessing:
        for key in ("pp_train", "pp_eval", "mean", "std"):
            old = info.preprocessing[key]
            old = tuple(old) if isinstance(old, (list, tuple)) else old
            now = tuple(config.data[key]) if isinstance(old, tuple) else config.data[key]
            if now != old:
                if now:
                    notes.append(f"config.data.{key}: {now!r} -> {old!r}, as {info.workdir} trained "
                                 "(continual.keep_preprocessing)")
                config.data[key] = old
    return notes


@dataclasses.dataclass
class Update:
    """What a continual run adds to an ordinary one (see the module docstring)."""

    config: ml_collections.ConfigDict
    info: workdir_lib.RunInfo
    plan: ClassPlan
    splits: dict[str, sources.LabelledSource]
    replay: sources.LabelledSource | None
    replay_rows: int
    old: object  # inference.TrainedModel of the old run
    before: float | None  # the old model's top-1 on the old classes' validation images

    def fit_head(self, params: dict[str, np.ndarray], head_paths: tuple[str, ...]) -> dict[str, np.ndarray]:
        """The old run's params with its head's class axis (the last) laid out for this run's classes:
        kept classes' rows copied by name, new classes' zero (as a new head)."""
        old_count, fitted = len(self.plan.old_names), dict(params)
        for name, value in params.items():
            if models.matches(name, head_paths) and value.shape[-1] == old_count:
                head = np.zeros((*value.shape[:-1], len(self.plan.names)), value.dtype)
                head[..., self.plan.old_indices] = value[..., self.plan.old_columns]
                fitted[name] = head
        return fitted

    def with_lwf(self, loss: steps.Loss) -> steps.Loss:
        """`loss` + continual.distill_old * Learning-without-Forgetting: the old model's soft targets on the
        kept old classes (`loss` itself when distill_old is 0)."""
        spec = self.config.continual
        if spec.distill_old == 0:
            return loss
        old_model = distill.Teacher.from_model(
            "distill_old", self.old.model, mean=self.old.mean, std=self.old.std,
            image_size=self.info.preprocessing.get("input_size"),
            teacher_columns=self.plan.old_columns, student_columns=self.plan.old_indices,
        )
        term = distill.distillation_term(old_model, weight=spec.distill_old, mode="soft", temperature=spec.temperature,
                                         student_mean=self.config.data.mean, student_std=self.config.data.std)
        return loss.plus("distill_old", term, {old_model.name: old_model.state})

    def class_counts(self) -> list[int]:
        """Training examples per class, replay included (for config.data.class_weights)."""
        counts = np.asarray(list(self.splits["train"].class_counts().values()))
        if self.replay is not None and self.replay_rows:
            counts = counts + np.asarray(list(self.replay.class_counts().values()))
        return counts.tolist()


def derived_metrics(metrics: dict[str, float], before: float | None) -> dict[str, float]:
    """`metrics` with, per evaluated model (each <prefix>old_accuracy), the old/new mean accuracy and the
    forgetting: `before` (the old model's old-class accuracy) minus the old-class accuracy."""
    metrics = dict(metrics)
    for prefix in [key.removesuffix("old_accuracy") for key in metrics if key.endswith("/old_accuracy")]:
        old, new = metrics[f"{prefix}old_accuracy"], metrics.get(f"{prefix}new_accuracy")
        if new is not None:
            metrics[f"{prefix}old_new_mean_accuracy"] = (old + new) / 2
        if before is not None:
            metrics[f"{prefix}old_accuracy_before"] = before
            metrics[f"{prefix}forgetting"] = before - old
    return metrics


class Continual(base.Task):
    """The task of a run whose config.model_init is a finished jaxclf run (see the module docstring)."""

    name = "continual"

    def __init__(self, config: ml_collections.FrozenConfigDict, pretrained_info: object | None,
                 record: dict | None = None):
        """`record`: the finished run's continual.json (`reopen`); else `splits` prepares the update, which
        the later training hooks read."""
        super().__init__(config, pretrained_info)
        self.record, self.update = record, None
        if record is not None:
            self.plan, self.before = _recorded_plan(record), record.get("old_accuracy_before")

    @classmethod
    def applies(cls, config: ml_collections.ConfigDict, pretrained_info: object | None) -> bool:
        return getattr(pretrained_info, "source_format", "") == "jaxclf_workdir"

    @classmethod
    def check_config(cls, config: ml_collections.ConfigDict, pretrained_info: object | None) -> list[str]:
        return check_config(config, pretrained_info)

    def splits(self, splits: dict[str, sources.LabelledSource], workdir: str) -> dict[str, sources.LabelledSource]:
        if self.record is not None:
            return assemble_splits(splits, self.plan, _OldData(self.record["old_data"]))
        self.update = prepare(self.config, self.pretrained_info, splits, workdir)
        self.plan, self.before = self.update.plan, self.update.before
        return self.update.splits

    def init_params(self, params: dict[str, np.ndarray], model) -> dict[str, np.ndarray]:
        return self.update.fit_head(params, model.head_paths())

    def class_counts(self, counts: list[int]) -> list[int]:
        return self.update.class_counts()

    def replay(self) -> base.Replay | None:
        return base.Replay(self.update.replay, self.update.replay_rows) if self.update.replay_rows else None

    def loss(self, loss: steps.Loss, class_names: tuple[str, ...]) -> steps.Loss:
        return self.update.with_lwf(loss)

    def eval_groups(self) -> dict[str, np.ndarray]:
        return self.plan.groups()

    def eval_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return derived_metrics(metrics, self.before)

    @classmethod
    def reopen(cls, config: ml_collections.ConfigDict, workdir: str) -> Continual | None:
        record = _read_record(workdir)
        return None if record is None else cls(config, None, record)

    def report_sections(self, source: sources.LabelledSource, log_probs: np.ndarray, labels: np.ndarray,
                        batch_size: int) -> dict[str, dict]:
        return {"continual": evaluation_report(self.record, source, log_probs, labels, batch_size)}

    def summary_lines(self, report: dict) -> dict[str, str]:
        return {"Old and new classes (continual learning)": summary_line(report["continual"])}


def prepare(config: ml_collections.FrozenConfigDict, info: workdir_lib.RunInfo, splits: dict, workdir: str) -> Update:
    """The update a resolved `config` describes, from the finished run `info` (model_init's); writes
    workdir/continual.json and, with continual.replay_per_class, workdir/exemplars/."""
    spec = config.continual
    old_data = _OldData(info.config["data"])
    replay = _replay_source(spec.replay, info, old_data)
    plan, notes = plan_classes(info.class_names, splits["train"].class_names,
                               replay.class_names if replay is not None else (), lwf=spec.distill_old > 0,
                               drop_classes=spec.drop_classes, old_run=info.workdir)
    for note in notes:
        print(f"continual: {note}", file=sys.stderr)
    run_splits = assemble_splits(splits, plan, old_data)
    if replay is not None:
        replay = combine.Relabelled(combine.only_classes(replay, plan.names), plan.names)
        if spec.replay_per_class:
            replay = _cap_per_class(replay, spec.replay_per_class, config.seed)
    replay_rows = _replay_rows(config, replay)
    if spec.replay_per_class:
        exemplars = combine.Concatenated(tuple(s for s in (replay, run_splits["train"]) if s is not None))
        write_exemplars(os.path.join(workdir, EXEMPLARS), _cap_per_class(exemplars, spec.replay_per_class, config.seed))
    old = workdir_lib.load_run(config.model_init)
    before = _accuracy_before(workdir, config, info, plan, run_splits["val"], old)
    return Update(config, info, plan, run_splits, replay, replay_rows, old, before)


def assemble_splits(splits: dict, plan: ClassPlan, old_data: _OldData) -> dict[str, sources.LabelledSource]:
    """The new data labelled by `plan.names`; val/test also take the old run's images of kept old
    classes that the new data's val/test lack (where the old run's data can still be read)."""
    result = {"train": combine.Relabelled(splits["train"], plan.names)}
    for split in ("val", "test"):
        parts = [combine.Relabelled(splits[split], plan.names)] if split in splits else []
        have = {n for n, count in splits[split].class_counts().items() if count} if split in splits else set()
        lacking = [n for n in plan.old_names if n in plan.names and n not in have]
        old_split = old_data.split(split) if lacking else None
        if old_split is not None:
            parts.append(combine.Relabelled(combine.only_classes(old_split, lacking), plan.names))
        if parts:
            result[split] = parts[0] if len(parts) == 1 else combine.Concatenated(tuple(parts))
    return result


class _OldData:
    """The old run's own data (its config.json's data block), read on first use; None where unreadable."""

    def __init__(self, data: dict):
        self.data, self._splits, self.error = data, None, None

    def split(self, name: str) -> sources.LabelledSource | None:
        if self._splits is None and self.error is None:
            try:
                self._splits = data_lib.load_splits(ml_collections.ConfigDict(self.data))
            except sources.DataError as e:
                self.error = str(e)
                print(f"continual: the old run's data cannot be read ({e}); its classes are evaluated only "
                      "where the new data has them", file=sys.stderr)
        return (self._splits or {}).get(name)


def _replay_source(spec: str, info, old_data: _OldData) -> sources.LabelledSource | None:
    """The replay data `continual.replay` names (classes by name, not yet relabelled)."""
    if spec == "none":
        return None
    if spec:
        try:
            return combine.class_folder(spec)
        except sources.DataError as e:
            raise sources.DataError(f"config.continual.replay={spec!r}: {e}") from None
    exemplars = os.path.join(info.workdir, EXEMPLARS)
    if os.path.isfile(os.path.join(exemplars, _EXEMPLARS_DONE)):
        return combine.class_folder(exemplars)
    train = old_data.split("train")
    if train is None:
        raise sources.DataError(
            f"config.continual.replay: the old run's training data ({old_data.data.get('root')}) cannot be "
            f"read: {old_data.error}. Point --config.continual.replay at a folder of the old classes' examples, "
            "or set it to none"
        )
    return train


def _replay_rows(config, replay) -> int:
    """Rows of each global batch drawn from the replay data."""
    fraction = config.continual.replay_fraction
    if not fraction:
        return 0
    if replay is None:
        raise config_lib.ConfigError(f"config.continual.replay_fraction={fraction} but config.continual.replay='none'")
    rows = max(1, round(config.batch_size * fraction))
    if rows >= config.batch_size or len(replay) < rows:
        raise config_lib.ConfigError(
            f"config.continual.replay_fraction={fraction} asks for {rows} of {config.batch_size} rows per batch "
            f"from {len(replay)} replay examples: lower it (or give more replay examples)"
        )
    return rows


def _cap_per_class(source: sources.LabelledSource, cap: int, seed: int) -> combine.Subset:
    """At most `cap` examples of each class, a seeded random choice (the same for the same data and seed)."""
    labels = np.asarray(source.labels)
    chosen = []
    for label, name in enumerate(source.class_names):
        members = np.flatnonzero(labels == label)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        chosen.append(np.sort(rng.permutation(members)[:cap]))
    return combine.Subset(source, np.concatenate(chosen).astype(np.int64))


def write_exemplars(root: str, source: sources.LabelledSource) -> None:
    """Copy the images of `source` to `root/train/<class>/` once (atomically: a temporary folder renamed)."""
    if jax.process_index() != 0 or os.path.isfile(os.path.join(root, _EXEMPLARS_DONE)):
        return
    paths = getattr(source, "paths", None)
    if paths is None:
        raise config_lib.ConfigError("config.continual.replay_per_class writes exemplar image files, which needs "
                                     "file-based data (config.data.source 'folder' or 'list')")
    parent = os.path.dirname(os.path.abspath(root))
    tmp = tempfile.mkdtemp(prefix=".exemplars.tmp-", dir=parent)
    try:
        labels = np.asarray(source.labels)
        for k, (path, label) in enumerate(zip(paths, labels)):
            folder = os.path.join(tmp, "train", source.class_names[label])
            os.makedirs(folder, exist_ok=True)
            shutil.copyfile(path, os.path.join(folder, f"{k:06d}_{os.path.basename(path)}"))
        with open(os.path.join(tmp, _EXEMPLARS_DONE), "w") as f:
            json.dump({"images": len(paths), "counts": source.class_counts()}, f)
        shutil.rmtree(root, ignore_errors=True)  # an earlier write that did not finish
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _old_class_examples(val: sources.LabelledSource, plan: ClassPlan) -> combine.Relabelled | None:
    """The validation examples of kept old classes, labelled as the old run labels them."""
    kept = [plan.names[i] for i in plan.old_indices]
    subset = combine.only_classes(val, kept)
    if not len(subset):
        return None
    return combine.Relabelled(subset, plan.old_names)


def old_model_accuracy(old, source: sources.LabelledSource | None, batch_size: int) -> float | None:
    """Top-1 of the old run's model on `source` (labelled in its classes), or None without examples."""
    if source is None:
        return None
    log_probs, labels, _ = predictions.predict_source(old, source, batch_size=batch_size)
    return float(np.mean(log_probs.argmax(axis=1) == labels))


def _accuracy_before(workdir: str, config, info, plan: ClassPlan, val, old) -> float | None:
    """The old model's old-class accuracy on this run's validation images, measured once and kept in continual.json."""
    record = _read_record(workdir)
    same = record and record.get("old_workdir") == info.workdir and record.get("old_step") == info.step \
        and record.get("class_names") == list(plan.names)
    if same:
        return record.get("old_accuracy_before")
    before = old_model_accuracy(old, _old_class_examples(val, plan), config.eval_batch_size or config.batch_size)
    if jax.process_index() == 0:
        record = {
            "old_workdir": info.workdir, "old_step": info.step, "old_class_names": list(plan.old_names),
            "class_names": list(plan.names), "dropped": list(plan.dropped), "old_data": info.config["data"],
            "old_accuracy_before": before,
        }
        with open(os.path.join(workdir, FILE), "w") as f:
            json.dump(record, f, indent=2)
    return before


def _read_record(workdir: str) -> dict | None:
    """The continual.json of `workdir` (None: not a continual run, or no workdir, as an artefact may have)."""
    if not workdir:
        return None
    try:
        with open(os.path.join(workdir, FILE)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _recorded_plan(record: dict) -> ClassPlan:
    return ClassPlan(tuple(record["old_class_names"]), tuple(record["class_names"]), tuple(record["dropped"]))


def evaluation_report(record: dict, source: sources.LabelledSource, log_probs: np.ndarray, labels: np.ndarray,
                      batch_size: int) -> dict:
    """Old-class and new-class top-1 of the continual run `record` (its continual.json) describes on `source`,
    their mean, and forgetting: the old model's old-class top-1 on the same images minus the updated model's."""
    plan = _recorded_plan(record)
    correct = log_probs.argmax(axis=1) == labels
    report = {"old_classes": len(plan.old_indices), "new_classes": len(plan.new_indices)}
    for group, ids in plan.groups().items():
        rows = np.isin(labels, ids)
        report[f"{group}_examples"] = int(rows.sum())
        report[f"{group}_accuracy"] = float(correct[rows].mean()) if rows.any() else None
    if report.get("old_accuracy") is not None and report.get("new_accuracy") is not None:
        report["old_new_mean_accuracy"] = (report["old_accuracy"] + report["new_accuracy"]) / 2
    report["old_accuracy_before"] = report["forgetting"] = None
    if report.get("old_accuracy") is not None:
        old_run = f"{record['old_workdir']}:{record['old_step']}"
        try:
            old = workdir_lib.load_run(old_run)
        except (ValueError, OSError) as e:  # the old run may be gone or moved; the report says so
            report["note"] = f"forgetting not measured: the old run {old_run} cannot be loaded ({e})"
            return report
        before = old_model_accuracy(old, _old_class_examples(source, plan), batch_size)
        report["old_accuracy_before"], report["forgetting"] = before, before - report["old_accuracy"]
    return report


def summary_line(update: dict) -> str:
    """One line of a continual run's old-class and new-class top-1, their mean and the forgetting."""
    def percent(key):
        return "n/a" if update.get(key) is None else f"{update[key]:.2%}"

    line = (f"old classes ({update['old_classes']}) accuracy {percent('old_accuracy')} (before the update "
            f"{percent('old_accuracy_before')}, forgetting {percent('forgetting')}); new classes "
            f"({update['new_classes']}) accuracy {percent('new_accuracy')}; mean {percent('old_new_mean_accuracy')}")
    return line + (f" ({update['note']})" if "note" in update else "")
