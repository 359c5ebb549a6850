"""Callbacks that tests load into `ftlab` subprocesses (through PYTHONPATH) to inject faults or check state."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch


class KillAtEpoch(pl.Callback):
    """SIGKILL this process when `epoch` starts, i.e. right after the previous epoch's checkpoints were written."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


class DumpState(pl.Callback):
    """At the end of fit, write each process's trainable count, param groups and a weights checksum to JSON."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state: dict[str, Any] = {
            "trainable": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
            "groups": [[g.get("name"), g["lr"], len(g["params"])] for g in trainer.optimizers[0].param_groups],
            "checksum": float(sum(p.detach().double().sum() for p in pl_module.parameters())),
            "val_acc": float(trainer.callback_metrics.get("val/acc", torch.tensor(-1.0))),
            "epoch": trainer.current_epoch,
        }
        Path(f"{self.path}.rank{trainer.global_rank}.json").write_text(json.dumps(state))


def in_process(args: list[str], log: Path) -> int:
    """A sweep launcher that runs `ftlab <args>` inside the test process (no interpreter start-up per run)."""
    import contextlib

    from lightning_modules.cli import cli_main
    from lightning_modules.errors import ConfigError

    with log.open("a") as out, contextlib.redirect_stdout(out):
        try:
            cli_main(args)
        except ConfigError as err:
            print(f"ftlab: error: {err}")
            return 2
        except SystemExit as err:
            return err.code if isinstance(err.code, int) else 1
    return 0


class FailAtEpoch(pl.Callback):
    """Raise when `epoch` starts if the environment variable `FTLAB_TEST_FAIL` is set: a crash after checkpoints."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch and os.environ.get("FTLAB_TEST_FAIL"):
            raise RuntimeError("FailAtEpoch: the injected crash")
