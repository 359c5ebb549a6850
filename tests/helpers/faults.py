"""Fault injection: callbacks that tests load into `ftlab` runs (by class path, through PYTHONPATH in subprocesses)
to kill a run, fill the disk, slow it down, poison a batch, fail an epoch or dump its state."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch


def _sigkill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(pl.Callback):
    """SIGKILL this process at the start of `epoch` (right after the previous epoch's checkpoints were written),
    or just before batch `batch` of that epoch (a kill in the middle of an epoch)."""

    def __init__(self, epoch: int, batch: int | None = None) -> None:
        self.epoch = epoch
        self.batch = batch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch and self.batch is None:
            _sigkill()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            _sigkill()


class CutSave(pl.Callback):
    """From `epoch` on, a checkpoint write to a file whose name contains `only` goes through `cut` (the fault);
    other writes go through."""

    def __init__(self, epoch: int, only: str = "") -> None:
        self.epoch = epoch
        self.only = only

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != self.epoch:
            return
        real_save = torch.save

        def cut_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            if self.only not in str(getattr(f, "name", f)):
                return real_save(obj, f, *args, **kwargs)
            return self.cut(lambda target: real_save(obj, target, *args, **kwargs), f)

        torch.save = cut_save

    def cut(self, save: Callable[[Any], None], f: Any) -> None:
        """Write the checkpoint (`save(target)` writes it to a path or a binary file) to `f`, or fail to."""
        raise NotImplementedError


class KillDuringSave(CutSave):
    """From `epoch` on, the next checkpoint write to a file whose name contains `only` is cut short: half its bytes
    reach the file, then SIGKILL. Other writes go through."""

    def cut(self, save: Callable[[Any], None], f: Any) -> None:
        buffer = io.BytesIO()
        save(buffer)
        data = buffer.getvalue()
        with open(f, "wb") if isinstance(f, str | Path) else f as out:  # a path or a file (AtomicCheckpointIO's)
            out.write(data[: len(data) // 2])
            out.flush()
            os.fsync(out.fileno())
        _sigkill()


class FullDisk(CutSave):
    """From `epoch` on, a checkpoint write to a file whose name contains `only` fills the disk: its first `room`
    bytes reach the file, then the file's write fails with the system's OSError (ENOSPC, "No space left on
    device"), under torch's own writer, as on a disk that is full."""

    def __init__(self, epoch: int, only: str = "", room: int = 100_000) -> None:
        super().__init__(epoch, only)
        self.room = room

    def cut(self, save: Callable[[Any], None], f: Any) -> None:
        save(_Filling(f, self.room))


class _Filling:
    """A binary file that takes `room` bytes, then fails each write with ENOSPC."""

    def __init__(self, file: Any, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data: bytes) -> int:
        fits = bytes(data[: self.room])
        self.file.write(fits)
        self.room -= len(fits)
        if len(fits) < len(data):
            self.file.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return len(data)

    def flush(self) -> None:
        self.file.flush()


class SlowBatches(pl.Callback):
    """Sleep `seconds` after every training batch: epochs long enough to send a signal in the middle of one."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        time.sleep(self.seconds)


class PoisonBatch(pl.Callback):
    """Fill the images of the batch at global step `step` with NaN (a corrupt batch that makes the loss NaN), on
    every process or only on process `rank`."""

    def __init__(self, step: int, rank: int | None = None) -> None:
        self.step = step
        self.rank = rank

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            batch.inputs.fill_(float("nan"))


class DumpState(pl.Callback):
    """At the end of fit, write each process's trainable count, param groups, a weights checksum and the positions
    it trained on per epoch (as cached features or as images) to JSON, and its state dict beside it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.seen: dict[str, dict[str, list[int]]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, index: int) -> None:
        kinds = self.seen.setdefault(str(trainer.current_epoch), {"features": [], "images": []})
        kinds["features" if batch.features else "images"] += batch.indices.tolist()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state: dict[str, Any] = {
            "trainable": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
            "groups": [[g.get("name"), g["lr"], len(g["params"])] for g in trainer.optimizers[0].param_groups],
            "checksum": float(sum(p.detach().double().sum() for p in pl_module.parameters())),
            "val_acc": float(trainer.callback_metrics.get("val/acc", torch.tensor(-1.0))),
            "val_loss": float(trainer.callback_metrics.get("val/loss", torch.tensor(-1.0))),
            "epoch": trainer.current_epoch,
            "seen": self.seen,
        }
        Path(f"{self.path}.rank{trainer.global_rank}.json").write_text(json.dumps(state))
        torch.save(pl_module.state_dict(), f"{self.path}.rank{trainer.global_rank}.pt")  # every tensor, to compare


class FailAtEpoch(pl.Callback):
    """Raise when `epoch` starts if the environment variable `FTLAB_TEST_FAIL` is set: a crash after checkpoints."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch and os.environ.get("FTLAB_TEST_FAIL"):
            raise RuntimeError("FailAtEpoch: the injected crash")
