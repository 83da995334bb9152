"""A search space in the config style, `FIELD=DISTRIBUTION`, checked against jaxclf's config before any trial.

    optim.lr=loguniform(1e-4,1e-1)   model.drop_path_rate=uniform(0,0.3)   optim.warmup_steps=int(0,500)
    batch_size=logint(16,256)        optim.name=choice(sgd,adamw)          batch_size=choice(64,128)

Each axis becomes an Optuna distribution named by its field; a trial's sampled values become the
overrides `FIELD=VALUE` of an ordinary `jaxclf.train` run (`study.trial_overrides`). `check` applies every bound and
every choice to the config exactly as a trial will, so an unknown field (with the nearest valid
name), a value of the wrong kind or a model option the model does not take fails before any
trial starts.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import re

import ml_collections
from optuna import distributions

from jaxclf import config as config_lib, models

FORMS = {
    "uniform": "uniform(a,b)",
    "loguniform": "loguniform(a,b)",
    "int": "int(a,b)",
    "logint": "logint(a,b)",
    "choice": "choice(v1,v2,...)",
}
_USAGE = f"use {', '.join(list(FORMS.values())[:-1])} or {FORMS['choice']}"
# Fields whose change would make the trials' objective values incomparable.
_NOT_SEARCHABLE = ("best_metric", "best_mode")


class SpaceError(ValueError):
    """A mistake in the search space; the one-line message names the axis and the fix."""


@dataclasses.dataclass(frozen=True)
class Axis:
    """One searched field: its distribution as written (`loguniform(1e-4,1e-1)`) and as Optuna's."""

    field: str
    text: str
    distribution: distributions.BaseDistribution

    @property
    def is_choice(self) -> bool:
        return isinstance(self.distribution, distributions.CategoricalDistribution)

    def values_to_check(self) -> list:
        """The bounds of a range, or every choice: what `check` applies to the config."""
        d = self.distribution
        return list(d.choices) if self.is_choice else [d.low, d.high]


def parse(items: dict[str, str]) -> dict[str, Axis]:
    """{field: distribution text} -> {field: Axis}; raises SpaceError for an unparsable one or an empty space."""
    if not items:
        raise SpaceError("the search space is empty: give --space FIELD=DISTRIBUTION (e.g. --space "
                         "'optim.lr=loguniform(1e-4,1e-1)'; " + _USAGE + ") or --space FILE.py")
    return {field: parse_axis(field, text) for field, text in items.items()}


def split_item(item: str) -> tuple[str, str]:
    """'optim.lr=loguniform(1e-4,1e-1)' -> ('optim.lr', 'loguniform(1e-4,1e-1)')."""
    field, sep, text = item.partition("=")
    if not sep or not field.strip() or not text.strip():
        raise SpaceError(f"--space {item!r} must look like FIELD=DISTRIBUTION ({_USAGE})")
    return field.strip(), text.strip()


def parse_axis(field: str, text: str) -> Axis:
    """One axis from its distribution text."""
    where = f"--space {field}={text}"
    match = re.fullmatch(r"\s*(\w+)\s*\((.*)\)\s*", text)
    if not match:
        raise SpaceError(f"{where}: not a distribution; {_USAGE}")
    kind, arguments = match.group(1), [a.strip() for a in match.group(2).split(",")]
    if kind not in FORMS:
        close = difflib.get_close_matches(kind, FORMS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise SpaceError(f"{where}: unknown distribution {kind!r}{hint}; {_USAGE}")
    if kind == "choice":
        if any(not a for a in arguments):
            raise SpaceError(f"{where}: an empty choice; write {FORMS['choice']}")
        if len(set(arguments)) != len(arguments):
            raise SpaceError(f"{where}: a choice given twice")
        return Axis(field, text, distributions.CategoricalDistribution(arguments))
    if len(arguments) != 2:
        raise SpaceError(f"{where}: {kind} takes two bounds, {FORMS[kind]}")
    number = int if kind in ("int", "logint") else float
    try:
        low, high = (number(a) for a in arguments)
    except ValueError:
        raise SpaceError(f"{where}: the bounds of {FORMS[kind]} must be {number.__name__}s") from None
    log = kind.startswith("log")
    if not (low < high if number is float else low <= high) or (log and low <= 0):
        raise SpaceError(f"{where}: needs {'0 < ' if log else ''}a {'<' if number is float else '<='} b")
    if number is float:
        return Axis(field, text, distributions.FloatDistribution(low, high, log=log))
    return Axis(field, text, distributions.IntDistribution(low, high, log=log))


def check(space: dict[str, Axis], config: ml_collections.ConfigDict, fixed: list[str]) -> dict[str, Axis]:
    """Fail (SpaceError) unless every value of every axis is a valid override of `config`, whose fixed
    overrides `fixed` are already applied. Returns the space with choices typed as the field is (64, not "64")."""
    fixed_fields = {o.partition("=")[0] for o in fixed}
    checked = {}
    for field, axis in space.items():
        where = f"--space {field}={axis.text}"
        if field in fixed_fields:
            raise SpaceError(f"{where}: {field} is also fixed after --; search it or fix it, not both")
        if field in _NOT_SEARCHABLE:
            raise SpaceError(f"{where}: trials must share the objective; set config.{field} after -- instead")
        model_names = _model_names(space, config)
        if field.startswith("model."):
            _check_model_option(where, field, model_names)
        _check_kind(where, axis, _default(config, field, model_names))
        typed = []
        for value in axis.values_to_check():
            trial_config = copy.deepcopy(config)
            try:
                config_lib.apply_override(trial_config, f"{field}={value}")
                config_lib.validate(trial_config)
            except config_lib.ConfigError as e:
                raise SpaceError(f"{where}: {e}") from None
            typed.append(_get(trial_config, field))
        if axis.is_choice:
            if not all(isinstance(v, (bool, int, float, str)) for v in typed):
                raise SpaceError(f"{where}: choices must be numbers, words or true/false")
            axis = Axis(field, axis.text, distributions.CategoricalDistribution(typed))
        checked[field] = axis
    return checked


def to_json(space: dict[str, Axis]) -> dict[str, str]:
    """{field: Optuna's JSON of its distribution}, for BASE/search.json."""
    return {field: distributions.distribution_to_json(axis.distribution) for field, axis in space.items()}


def _get(config: ml_collections.ConfigDict, field: str):
    node = config
    for name in field.split("."):
        node = node[name]
    return node


def _model_names(space: dict[str, Axis], config: ml_collections.ConfigDict) -> list[str]:
    """The models the trials build: config.model_name, or each choice when it is searched."""
    axis = space.get("model_name")
    return list(axis.distribution.choices) if axis and axis.is_choice else [config.model_name]


def _check_model_option(where: str, field: str, model_names: list[str]) -> None:
    option = field.split(".")[1]
    for name in model_names:
        try:
            accepted = models.options(name)
        except ValueError as e:
            raise SpaceError(f"{where}: config.model_name: {e}") from None
        if option not in accepted:
            close = difflib.get_close_matches(option, accepted, n=1)
            hint = f" Did you mean config.model.{close[0]}?" if close else ""
            raise SpaceError(f"{where}: model {name!r} has no option {option!r}.{hint} "
                             f"(its options: {', '.join(sorted(accepted)) or 'none'})")


def _default(config: ml_collections.ConfigDict, field: str, model_names: list[str]):
    """The field's value before the search: the config's, else (an unset model option) the model's default,
    else None (an unknown field, which applying the override reports)."""
    try:
        return _get(config, field)
    except (KeyError, AttributeError):
        if not field.startswith("model."):
            return None
    default = models.options(model_names[0]).get(field.split(".")[1], inspect.Parameter.empty)
    return None if default is inspect.Parameter.empty else default


def _check_kind(where: str, axis: Axis, default) -> None:
    """Ranges only for numeric fields: uniform/loguniform for floats, int/logint for ints (or floats)."""
    if axis.is_choice or default is None:
        return
    kind = type(default).__name__
    if isinstance(axis.distribution, distributions.FloatDistribution) and not isinstance(default, float):
        fix = "int(a,b), logint(a,b) or choice(...)" if kind == "int" else "choice(...)"
        raise SpaceError(f"{where}: config.{axis.field} is {kind} (default {default!r}); use {fix}")
    if isinstance(axis.distribution, distributions.IntDistribution) and (
            isinstance(default, bool) or not isinstance(default, (int, float))):
        raise SpaceError(f"{where}: config.{axis.field} is {kind} (default {default!r}); use choice(...)")
