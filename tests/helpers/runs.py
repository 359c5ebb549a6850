"""Running `ftlab` from a test: the overrides that make any experiment tiny, the own-images recipe on a tiny
backbone, a fault injected by config, `ftlab` in this process or in a child process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO

# Overrides that make any experiment tiny: fast_dev_run, no workers, no progress bar.
FAST = [
    "--trainer.fast_dev_run=true",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.init_args.num_workers=0",
]


def folder_args(root: Path, batch_size: int) -> list[str]:
    """The own-images recipe with a tiny stand-in backbone."""
    return [
        "--config",
        "experiments/data/image_folder.yaml",
        "--model.backbone=timm/test_resnet",
        "--model.weights=none",
        "--model.image_size=32",
        f"--data.init_args.root={root}",
        f"--data.init_args.batch_size={batch_size}",
        "--data.init_args.num_workers=0",
        "--trainer.enable_progress_bar=false",
        "--test_after_fit=false",  # the recipe tests after its fit; a test here runs `test` itself when it wants one
    ]


def in_process(args: list[str], log: Path) -> int:
    """A sweep launcher that runs `ftlab <args>` inside the test process (no interpreter start-up per run)."""
    import contextlib

    from datamodules.common import ConfigError
    from lightning_modules.cli.main import cli_main

    with log.open("a") as out, contextlib.redirect_stdout(out):
        try:
            cli_main(args)
        except ConfigError as err:
            print(f"ftlab: error: {err}")
            return 2
        except SystemExit as err:
            return err.code if isinstance(err.code, int) else 1
    return 0


def entry_point(argv: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`ftlab <argv>` through the console entry point (`cli.main`) in this process: exit status, stdout, stderr."""
    from lightning_modules.cli import main as cli

    capfd.readouterr()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("sys.argv", ["ftlab", *argv])
            cli.main()
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code if isinstance(exit_info.code, int) else 1
    out, err = capfd.readouterr()
    return code, out, err


def inject(root: Path, name: str, class_path: str, **init_args: Any) -> list[str]:
    """`--config` of a file adding one callback (a fault injector of `tests.helpers.faults`)."""
    args = ", ".join(f"{k}: {v}" for k, v in init_args.items())
    path = root / f"{name}.yaml"
    path.write_text(f"trainer:\n  callbacks+:\n    - class_path: {class_path}\n      init_args: {{{args}}}\n")
    return ["--config", str(path)]


def start_ftlab(cwd: Path, *args: str, **popen: Any) -> subprocess.Popen[str]:
    """`ftlab <args>` started in a child process (a signal needs a process of its own), with this checkout importable
    and its output captured."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "lightning_modules.cli.main", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def ftlab(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`ftlab <args>` in a child process, to its end: exit code -9 when it was killed by SIGKILL."""
    with start_ftlab(cwd, *args) as child:
        out, err = child.communicate(timeout=600)
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)
