"""Every command README.md and docs/*.md show is one that works: the module or script exists, the make
target exists, every --flag is one its argparse parser accepts (a whole command in a code block parses
as written), and every --config.a.b= key is a field of the config it names (model.* an option of its model).

The parsers are the commands' own: each command's `main(argv)` is called with `parse_args` and
`parse_known_args` intercepted, so nothing runs beyond building the parser."""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib
import os
import re
import runpy
import shlex
import sys

import pytest

from jaxclf import config as config_lib, models
from launch import space as space_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_FILES = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
SHELL_LANGUAGES = ("bash", "sh", "shell", "")
INLINE_COMMAND = re.compile(r"`((?:\S*python3?|make) [^`]+)`")
INLINE_OVERRIDE = re.compile(r"`(--config\.[^`\s]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
# A repository path in backticks: `jaxclf/steps.py`, `tests/test_distill.py::test_x`, `jaxclf/kernels/`.
SOURCE_PATH = re.compile(r"`((?:jaxclf|launch|configs|tests|bench|docs)/[\w/.-]*?(?:\.(?:py|md|sh|html)|/))(?:::\w+)?[`:]")


@dataclasses.dataclass(frozen=True)
class Command:
    """One command line of the docs: where it is, its words, and whether it is a whole command."""

    where: str
    words: tuple[str, ...]
    complete: bool  # from a code block (parsed as written), not a command named in prose

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.words)}"


def _shell_lines(block: str) -> list[tuple[int, str]]:
    """A code block's logical lines, backslash continuations joined, each with its first line's offset."""
    lines, offset = [], 0
    for line in re.split(r"(?<!\\)\n", block):
        lines.append((offset, line.replace("\\\n", " ")))
        offset += line.count("\n") + 1
    return lines


def _words(line: str) -> list[str] | None:
    """The words of a shell line without comments and leading VAR=value assignments; None if not a command."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        words = words[1:]
    return words


def extract_commands(relative_path: str) -> list[Command]:
    """The `python ...` and `make ...` commands in a Markdown file: code blocks and inline code spans."""
    with open(os.path.join(ROOT, relative_path)) as f:
        text = f.read()
    found = []
    for match in FENCE.finditer(text):
        if match.group(1) not in SHELL_LANGUAGES:
            continue
        first_line = text.count("\n", 0, match.start()) + 2
        for offset, line in _shell_lines(match.group(2)):
            words = _words(line)
            if words and _is_checked(words):
                found.append(Command(f"{relative_path}:{first_line + offset}", tuple(words), complete=True))
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for pattern in (INLINE_COMMAND, INLINE_OVERRIDE):
        for match in pattern.finditer(prose):
            words = _words(match.group(1))
            if words and (_is_checked(words) or pattern is INLINE_OVERRIDE):
                line = prose.count("\n", 0, match.start()) + 1
                found.append(Command(f"{relative_path}:{line}", tuple(words), complete=False))
    return found


def _is_checked(words: list[str]) -> bool:
    if words[0] == "make":
        return True
    return os.path.basename(words[0]).startswith("python") and len(words) > 1 and (
        words[1] == "-m" or words[1].startswith("bench/"))


ALL_COMMANDS = [command for path in DOC_FILES for command in extract_commands(os.path.relpath(path, ROOT))]
PYTHON_COMMANDS = [c for c in ALL_COMMANDS if c.words[0] != "make" and not c.words[0].startswith("--config.")]
PROSE_OVERRIDES = [c for c in ALL_COMMANDS if c.words[0].startswith("--config.")]


class _Captured(BaseException):
    """Raised instead of parsing: carries the parser a command built (a BaseException, so a command's own
    `except Exception` does not swallow it)."""

    def __init__(self, parser: argparse.ArgumentParser, known_only: bool):
        super().__init__()
        self.parser, self.known_only = parser, known_only


class _ParseError(Exception):
    pass


def _capture_all(self, *args, **kwargs):
    raise _Captured(self, known_only=False)


def _capture_known(self, *args, **kwargs):
    raise _Captured(self, known_only=True)


def _raise_error(self, message):
    raise _ParseError(f"{self.prog}: {message}")


_PARSERS: dict[str, _Captured] = {}


def command_parser(words: tuple[str, ...]) -> _Captured:
    """The parser `python -m MODULE` or `python bench/SCRIPT.py` builds (once per command)."""
    target = words[2] if words[1] == "-m" else words[1]
    if target not in _PARSERS:
        try:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(sys, "argv", [target, "--help"])
                patch.setattr(argparse.ArgumentParser, "parse_args", _capture_all)
                patch.setattr(argparse.ArgumentParser, "parse_known_args", _capture_known)
                if words[1] == "-m":
                    module = importlib.import_module(target)
                    if not hasattr(module, "main"):
                        module = importlib.import_module(f"{target}.__main__")
                    module.main(["--help"])
                else:
                    runpy.run_path(os.path.join(ROOT, target), run_name="__main__")
        except _Captured as captured:
            _PARSERS[target] = captured
        assert target in _PARSERS, f"{shlex.join(words)}: its main() returned without parsing arguments"
    return _PARSERS[target]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {name: sub for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name, sub in action.choices.items()}


def _option_names(parser: argparse.ArgumentParser) -> set[str]:
    return {name for action in parser._actions for name in action.option_strings}


def _arguments(words: tuple[str, ...]) -> list[str]:
    """What follows `python -m MODULE` or `python SCRIPT`."""
    return list(words[3:] if words[1] == "-m" else words[2:])


def _split_at_double_dash(args: list[str]) -> tuple[list[str], list[str]]:
    return (args[: args.index("--")], args[args.index("--") + 1:]) if "--" in args else (args, [])


def _flags(words: list[str]) -> list[str]:
    return [w.split("=", 1)[0] for w in words if w.startswith("--") and not w.startswith("--config.")]


def _overrides(words: tuple[str, ...]) -> list[str]:
    return [w[len("--config."):] for w in words if w.startswith("--config.")]


def _config_file(words: tuple[str, ...]) -> str | None:
    for i, word in enumerate(words):
        if word == "--config" and i + 1 < len(words):
            return words[i + 1]
        if word.startswith("--config="):
            return word.split("=", 1)[1]
    return None


def check_flags(command: Command) -> None:
    """Every --flag is an option of the command's parser (the subcommand's, where it has subcommands);
    a whole command parses as written, with --config.a.b=VALUE the only items left over."""
    captured = command_parser(command.words)
    args, after_dash = _split_at_double_dash(_arguments(command.words))
    parser, subs = captured.parser, _subparsers(captured.parser)
    chosen = next((w for w in args if w in subs), None)
    options = _option_names(parser) | (_option_names(subs[chosen]) if chosen else set())
    unknown = [flag for flag in _flags(args) if flag not in options]
    assert not unknown, f"{command}\n  {', '.join(unknown)} not accepted (options: {', '.join(sorted(options))})"
    assert all(w.startswith("--config.") for w in after_dash), f"{command}\n  after --, only --config.a.b=VALUE"
    if not command.complete:
        return
    for p in (parser, *subs.values()):
        p.allow_abbrev = False  # a documented flag is spelled out in full
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "error", _raise_error)
        try:
            _, rest = parser.parse_known_args(_arguments(command.words))
        except _ParseError as e:
            pytest.fail(f"{command}\n  {e}")
    leftover = [w for w in rest if not (captured.known_only and w.startswith("--config."))]
    assert not leftover, f"{command}\n  not accepted: {' '.join(leftover)}"


def _grid_overrides(words: tuple[str, ...]) -> list[str]:
    """launch.sweep's `--grid FIELD=V1,V2,...` as one override per value."""
    overrides = []
    for flag, value in zip(words, words[1:]):
        if flag == "--grid":
            field, _, values = value.partition("=")
            overrides += [f"{field}={v}" for v in values.split(",")]
    return overrides


def _space_items(words: tuple[str, ...]) -> list[str]:
    """launch.search's `--space FIELD=DISTRIBUTION` items (a `--space FILE.py` is not one)."""
    return [value for flag, value in zip(words, words[1:]) if flag == "--space" and "=" in value]


def _is_placeholder(override: str) -> bool:
    """`--config.FIELD=VALUE` in prose names the form, not a field."""
    return override.endswith("=VALUE")


def check_config_keys(command: Command) -> None:
    """The config file exists and loads with the command's overrides (and a sweep's grid values); model.*
    keys are options of its model; a search's --space items pass launch.space's own check. A command named
    in prose is checked against jaxclf/config.py's defaults (its config file may be a placeholder)."""
    overrides = [o for o in _overrides(command.words) + _grid_overrides(command.words) if not _is_placeholder(o)]
    config_file = _config_file(command.words) if command.complete else None
    try:
        config = config_lib.load_config(config_file) if config_file else config_lib.base_config()
        for override in overrides:
            config_lib.apply_override(config, override)
        config_lib.validate(config)
    except config_lib.ConfigError as e:
        pytest.fail(f"{command}\n  {e}")
    options = models.options(config.model_name)
    keys = [o.split("=")[0] for o in overrides]
    unknown = [k for k in keys if k.startswith("model.") and k.split(".")[1] not in options]
    assert not unknown, f"{command}\n  {unknown} not options of {config.model_name} ({', '.join(options)})"
    if _space_items(command.words):
        try:
            space = space_lib.parse(dict(space_lib.split_item(item) for item in _space_items(command.words)))
            space_lib.check(space, config, overrides)
        except space_lib.SpaceError as e:
            pytest.fail(f"{command}\n  {e}")


def _make_targets() -> set[str]:
    with open(os.path.join(ROOT, "Makefile")) as f:
        return {target for line in f if (m := re.match(r"^([\w.-]+(?: [\w.-]+)*)\s*:(?!=)", line))
                for target in m.group(1).split()}


def test_the_docs_show_commands_of_every_kind():
    """The extraction finds what the docs are known to hold (so the checks below cannot pass on nothing)."""
    modules = {c.words[2] for c in PYTHON_COMMANDS if c.words[1] == "-m"}
    assert {"jaxclf.train", "jaxclf.evaluate", "jaxclf.predict", "jaxclf.explain", "jaxclf.export", "jaxclf.serve",
            "jaxclf.convert", "jaxclf.data.check", "launch.slurm", "launch.sweep", "launch.search"} <= modules
    assert any(c.words[0] == "make" for c in ALL_COMMANDS) and PROSE_OVERRIDES
    assert any(_overrides(c.words) for c in PYTHON_COMMANDS if c.complete)
    with open(os.path.join(ROOT, "docs", "models.md")) as f:
        assert "jaxclf/models/layers.py" in SOURCE_PATH.findall(f.read())


@pytest.mark.parametrize("command", [c for c in ALL_COMMANDS if c.words[0] == "make"], ids=str)
def test_make_targets_exist(command):
    targets = [w for w in command.words[1:] if not w.startswith("-") and "=" not in w]
    missing = [t for t in targets if t not in _make_targets()]
    assert not missing, f"{command}\n  no Makefile target {missing}"


@pytest.mark.parametrize("command", PYTHON_COMMANDS, ids=str)
def test_python_commands_parse(command):
    if command.words[1] == "-m" and command.words[2] == "pytest":
        paths = [w.split("::")[0] for w in command.words[3:] if w.startswith("tests/")]
        assert all(os.path.exists(os.path.join(ROOT, p)) for p in paths), f"{command}\n  no such test file"
        return
    if command.words[1] == "-m":
        assert command.words[2].split(".")[0] in ("jaxclf", "launch"), f"{command}\n  not a jaxclf or launch module"
    else:
        assert os.path.isfile(os.path.join(ROOT, command.words[1])), f"{command}\n  no such script"
    check_flags(command)
    check_config_keys(command)


@pytest.mark.parametrize("override", PROSE_OVERRIDES, ids=str)
def test_overrides_in_prose_name_config_fields(override):
    """`--config.a.b=VALUE` written in a sentence names a field of jaxclf/config.py (model.*: of some model)."""
    key, has_value, _ = override.words[0][len("--config."):].partition("=")
    if key.startswith("model."):
        assert any(key.split(".")[1] in models.options(name) for name in models.list_models()), f"{override}"
    elif has_value:
        check_config_keys(override)
    else:
        node = config_lib.base_config()
        for name in key.split("."):
            assert name in node, f"{override}\n  not a field of jaxclf/config.py"
            node = node[name]


def _heading_anchors(path: str) -> set[str]:
    """GitHub's anchors for a Markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    with open(path) as f:
        text = FENCE.sub("", f.read())
    headings = re.findall(r"^#+ (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", [*DOC_FILES, os.path.join(ROOT, "bench", "README.md")],
                         ids=lambda p: os.path.relpath(p, ROOT))
def test_links_between_pages_resolve(page):
    """Every relative link names a file that exists and, with #anchor, a heading of that file."""
    with open(page) as f:
        text = FENCE.sub("", f.read())
    broken = []
    for target in LINK.findall(text):
        if re.match(r"\w+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(resolved) or (anchor and anchor not in _heading_anchors(resolved)):
            broken.append(target)
    assert not broken, f"{os.path.relpath(page, ROOT)}: broken links {broken}"


@pytest.mark.parametrize("page", DOC_FILES, ids=lambda p: os.path.relpath(p, ROOT))
def test_source_paths_exist(page):
    """Every file or folder of the repository a page names in backticks exists (so a move shows up here)."""
    with open(page) as f:
        named = set(SOURCE_PATH.findall(f.read()))
    missing = sorted(p for p in named if not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, f"{os.path.relpath(page, ROOT)}: no such paths {missing}"


def test_readme_is_a_front_door_to_every_page():
    """README.md stays short (issue 29: at most 250 lines) and its index links every page under docs/."""
    with open(DOC_FILES[0]) as f:
        text = f.read()
    pages = {os.path.relpath(p, ROOT) for p in DOC_FILES[1:]}
    assert text.count("\n") <= 250, "README.md is over 250 lines: move the how-to into a page under docs/"
    assert pages <= set(LINK.findall(text)), f"README.md does not link {sorted(pages - set(LINK.findall(text)))}"


def test_checks_catch_broken_commands():
    """The checks fail on a misspelt flag, a missing argument, an unknown config key and a wrong model option."""
    broken = [
        Command("t", ("python", "-m", "jaxclf.evaluate", "--workdir", "runs/x", "--splitt", "val"), complete=True),
        Command("t", ("python", "-m", "jaxclf.export", "--workdir", "runs/x", "--out", "x.onnx"), complete=True),
        Command("t", ("python", "-m", "launch.sweep", "summary", "runs/x", "--grid", "a=1"), complete=True),
        Command("t", ("python", "-m", "jaxclf.train", "--config", "configs/quickstart.py", "--config.optim.lrr=1"),
                complete=True),
        Command("t", ("python", "-m", "jaxclf.train", "--config", "configs/quickstart.py",
                      "--config.model.no_such_option=1"), complete=True),
        Command("t", ("python", "-m", "jaxclf.train", "--config", "configs/no_such_config.py"), complete=True),
        Command("t", ("python", "-m", "launch.sweep", "local", "--base", "runs/s", "--config", "configs/quickstart.py",
                      "--grid", "optim.lrr=0.1,0.05"), complete=True),
        Command("t", ("python", "-m", "launch.search", "run", "--config", "configs/quickstart.py", "--base", "runs/s",
                      "--space", "optim.lr=loguniform(1e-4)"), complete=True),
    ]
    for command in broken:
        with pytest.raises((AssertionError, pytest.fail.Exception)):
            check_flags(command)
            check_config_keys(command)
