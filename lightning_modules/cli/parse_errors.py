"""Config mistakes in one line: the file or key, what is wrong, the closest names; no usage dump.

jsonargparse reports a bad value as a Union error over every accepted type (up to 90 lines after a 77-line
usage); the parser below keeps the line that says what is wrong. YAML files named by `--config` are read first,
so that a syntax error names its file and line.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import yaml
from lightning.pytorch.cli import LightningArgumentParser
from typing_extensions import override

from datamodules.common import ConfigError, check_range, close_names

NO_ATTRIBUTE = re.compile(r"module '([\w.]+)' has no attribute '(\w+)'")
NO_MODULE = re.compile(r"No module named '([\w.]+)'")
CLASS_PATH = re.compile(r"class_path '([\w.]+)'|Import path ([\w.]+)")
UNKNOWN_KEY = re.compile(
    r"does not accept option '([^']+)'|Key \"([^\"]+)\" is not expected|[Uu]nrecognized arguments: --([\w.]+)"
)
KEY = re.compile(r'Parser key "([^"]+)"')
EXPECTED = re.compile(r"Expected a <class '(\w+)'>")
GIVEN = re.compile(r"Given value: (.*)")
# a bad init arg of a class, reported inside the Union error of its parent key
INNER = re.compile(
    r"Problem with given class_path '[\w.]+':\s*Parser key \"([^\"]+)\":\s*Expected a <class '(\w+)'>\. Got value: (.*)"
)


def check_config_files(args: Sequence[str]) -> None:
    """A ConfigError naming the file (and line) when a `--config` file is missing or is not valid YAML."""
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--config="):
            value = arg.partition("=")[2]
        else:
            continue
        path = Path(value)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder: give one YAML file in it (--config {path}/<name>.yaml)")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            content = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"{where}: not valid YAML ({problem})") from None
        if not isinstance(content, dict):
            what = "is empty" if content is None else f"holds a {type(content).__name__}, not keys and values"
            raise ConfigError(f"config file {path} {what}: a config maps keys (trainer:, model:, data: ...) to values")


def check_numbers(config: Any) -> None:
    """Numbers the config sets for classes built later than the model (the optimizer, built at the first fit step)
    or by Lightning (the trainer, early stopping): a ConfigError naming the key and the allowed range, before any
    model is built. The model, the DataModule and the strategies check their own arguments."""
    optimizer = config.get("model", {}).get("optimizer")
    args = (optimizer.get("init_args") if hasattr(optimizer, "get") else None) or {}
    if "lr" in args:
        check_range("model.optimizer.init_args.lr", args["lr"], 0, low_open=True)
    if "weight_decay" in args:
        check_range("model.optimizer.init_args.weight_decay", args["weight_decay"], 0)
    if "momentum" in args:
        check_range("model.optimizer.init_args.momentum", args["momentum"], 0, 1)
    epochs = config.get("trainer", {}).get("max_epochs")
    if epochs != -1:
        check_range("trainer.max_epochs", epochs, 1, null="1000, or -1 for no limit")
    patience = (config.get("early_stopping") or {}).get("patience")
    if patience is not None:
        check_range("early_stopping.patience", patience, 0)


def parser_keys(parser: Any) -> list[str]:
    """Every option key a parser accepts, e.g. `trainer.max_epochs`: the keys of its defaults (jsonargparse's public
    `get_defaults`; argparse lists its options only in the private `_actions`). None when the defaults cannot be
    read either: the error is still reported, without close names."""
    try:
        defaults = parser.get_defaults(skip_validation=True)
    except Exception:  # reporting an error: a second one must not replace it
        return []
    return [key for key, _ in defaults.items() if key != "config" and not key.startswith("__")]


def _public_classes(module: str) -> list[str]:
    try:
        return [n for n in dir(importlib.import_module(module)) if n[:1].isupper()]
    except ImportError:
        return []


def summarize(message: str, keys: list[str]) -> str:
    """The one line of a jsonargparse error message that says what is wrong, with the closest names."""
    key_match = KEY.search(message)
    key = key_match.group(1) if key_match else None
    prefix = f"{key}: " if key else ""
    if found := NO_ATTRIBUTE.search(message):
        module, name = found.groups()
        close = close_names(name, _public_classes(module))
        hint = f"; close names: {', '.join(f'{module}.{c}' for c in close)}" if close else ""
        return f"{prefix}{module}.{name} does not exist{hint}"
    if found := NO_MODULE.search(message):
        path = CLASS_PATH.search(message)
        what = next(g for g in path.groups() if g) if path else found.group(1)
        return f"{prefix}cannot import {what}: no module named {found.group(1)}"
    if found := UNKNOWN_KEY.search(message):
        unknown = next(g for g in found.groups() if g)
        close = close_names(unknown, keys)
        hint = f"; close names: {', '.join(close)}" if close else "; `ftlab <command> --help` lists the keys"
        return f"unknown key {unknown}{hint}"
    if key and (inner := INNER.search(message)):
        name, expected_type, value = inner.groups()
        return f"{key}.init_args.{name}: {value.strip()!r} is not valid; expected {expected_type}"
    given = GIVEN.search(message)
    nested = given and ("init_args" in given.group(1) or "NestedArg" in given.group(1))  # a YAML dict or a flag
    if key and given and nested and "class_path" not in given.group(1):
        example = "torch.optim.AdamW" if key == "model.optimizer" else "<class>"
        also = " (for the learning rate alone: model.lr)" if key == "model.optimizer" else ""
        return (
            f"{key}: init_args without a class_path ({key} names no class here): give the class with them, "
            f"e.g. `{key}: {{class_path: {example}, init_args: ...}}`{also}"
        )
    if key and given:
        expected = [("null" if t == "NoneType" else t) for t in EXPECTED.findall(message)]
        wanted = f"; expected {' or '.join(expected)}" if expected else ""
        return f"{key}: {given.group(1).strip()!r} is not valid{wanted}"
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return " ".join(lines[:2])


class OneLineErrorParser(LightningArgumentParser):
    """LightningArgumentParser whose parse errors print `ftlab: error: <one line>` and exit 2, without usage."""

    @override
    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Print the summary; the full message stays available with `JSONARGPARSE_DEBUG=1` (raises instead)."""
        if not self.exit_on_error:
            super().error(message, ex)
        if os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        print(f"ftlab: error: {summarize(message, parser_keys(parser))}", file=sys.stderr)
        raise SystemExit(2)
