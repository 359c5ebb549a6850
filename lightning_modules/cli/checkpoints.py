"""Which file `--ckpt_path best|last` names: a checkpoint of the run the command names (the logger's `version`, else
the newest `version_N` folder of the experiment), never a newer file of another run."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from datamodules.common import ConfigError
from lightning_modules.reporting.checkpoint_io import CHECKPOINT_FILE, read_checkpoint

CKPT_SHORTCUTS = ("best", "last")
VERSION = re.compile(r"version_(\d+)")


def versions(root: Path) -> list[Path]:
    """The `version_N` run folders of an experiment folder, the newest (highest N) first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := VERSION.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def named_run(root: Path, version: int | str | None) -> Path | None:
    """The run folder a command names: the logger's `version` (N is `version_N`, a string is the folder's name, as
    Lightning's loggers name it), else the newest `version_N` under `root`; None when there is none yet."""
    if version is not None:
        return root / (version if isinstance(version, str) else f"version_{version}")
    found = versions(root)
    return found[0] if found else None


def run_checkpoints(run: Path, which: str) -> list[Path]:
    """The run's `<which>*.ckpt` files, the newest first."""
    return sorted((run / "checkpoints").glob(f"{which}*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)


def resolve_checkpoint(which: str, runs: tuple[Path, Any] | None) -> Path:
    """The `best` or `last` checkpoint of the run the command names (`named_run`), or a ConfigError naming that run
    and the other runs of the experiment that have one."""
    if runs is None:
        raise ConfigError(f"--ckpt_path {which} needs a logger to find the runs (trainer.logger is false)")
    root, logger_args = runs
    version = logger_args.get("version") if logger_args is not None else None
    run = named_run(root, version)
    if run is None:
        raise ConfigError(f"no run under {root} yet (no version_* folder); train first with `ftlab fit`")
    found = run_checkpoints(run, which)
    if found:
        return found[0]
    why = "its fit stopped before its first checkpoint" if (run / "config.yaml").is_file() else "no fit saved one"
    others = [(path, run_checkpoints(path, which)) for path in versions(root) if path != run]
    others = [(path, files) for path, files in others if files]
    if not others:
        raise ConfigError(f"{run} has no {which}*.ckpt ({why}), nor has any other run under {root}; train first")
    kind = "older runs" if version is None else "other runs"  # without a version named, `run` is the newest
    raise ConfigError(
        f"{run} has no {which}*.ckpt ({why}); {kind} with one: {', '.join(path.name for path, _ in others)}: "
        f"pass --ckpt_path {others[0][1][0]}"
    )


def intact_instead(bad: Path) -> str:
    """What `--ckpt_path` to pass instead of the unusable checkpoint `bad`: the newest checkpoint that reads whole
    in its run (the best one when `last` is damaged), else in the experiment's other runs (an earlier version's
    last), newest run first; without one, what to do."""
    run = bad.parent.parent if bad.parent.name == "checkpoints" else None
    runs = [] if run is None else [run, *(other for other in versions(run.parent) if other != run)]
    for folder in runs:
        for candidate in run_checkpoints(folder, ""):
            if candidate.name.startswith(".") or candidate.resolve() == bad.resolve():
                continue
            try:
                read_checkpoint(candidate)
            except ConfigError:
                continue
            return f"the newest intact checkpoint is {candidate}: pass --ckpt_path {candidate}"
    if run is not None:
        return f"no other checkpoint of {run.parent} reads whole: train again with `ftlab fit`"
    return f"pass --ckpt_path best, last or {CHECKPOINT_FILE}"
