"""Small callbacks: what trains, at which rate and how long an epoch takes; a stop on a NaN loss; a notice when a
resume redoes steps."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from datamodules.common import atomic_write
from lightning_modules.console import notice

PROGRESS_FILE = "progress.json"


class TrainingStopped(RuntimeError):
    """Training cannot go on (the loss became NaN or infinite); the message says where and what is left."""


class TrainingStateLogger(pl.Callback):
    """Logs `lr/<group>` for every param group (`lr/head`, `lr/layer4` ...), `trainable_params` and `time/epoch_s`.

    Learning rates and trainable parameters are logged at the first batch of each epoch, after every finetuning
    strategy has unfrozen what is due; `time/epoch_s` is the wall time of the epoch (training and its validation).
    """

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the epoch's clock."""
        self._epoch_start = time.perf_counter()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the epoch's wall time, `time/epoch_s`."""
        start = getattr(self, "_epoch_start", None)
        if start is not None:
            pl_module.log("time/epoch_s", time.perf_counter() - start, on_step=False, on_epoch=True, batch_size=1)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Log the learning rate of each named group and the number of trainable parameters."""
        if batch_idx != 0:
            return
        for i, optimizer in enumerate(trainer.optimizers):
            for j, group in enumerate(optimizer.param_groups):
                name = group.get("name", f"group{j}")
                key = f"lr/{name}" if len(trainer.optimizers) == 1 else f"lr/opt{i}/{name}"
                pl_module.log(key, float(group["lr"]), on_step=False, on_epoch=True, batch_size=1)
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        pl_module.log("trainable_params", float(trainable), on_step=False, on_epoch=True, batch_size=1)


class StopOnNonFiniteLoss(pl.Callback):
    """Stops training when the training loss is NaN or infinite, naming the epoch and step and the last good
    checkpoint. It checks before the backward pass, so the bad step changes no weight and no checkpoint is
    written after it; under DDP every process stops together (one agreed decision per step)."""

    def __init__(self) -> None:
        self.batch_idx = 0

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Remember the batch index for the message."""
        self.batch_idx = batch_idx

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        """Raise `TrainingStopped` if any process's loss is not finite."""
        bad = not bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):
            return
        value = float(loss.detach().float().flatten()[0]) if bad else "non-finite on another process"
        raise TrainingStopped(
            f"training loss became {value} at epoch {trainer.current_epoch}, step {trainer.global_step} "
            f"(batch {self.batch_idx} of the epoch); the step was not applied. "
            f"Last good checkpoint: {last_checkpoint(trainer) or 'none written yet'}"
        )


def last_checkpoint(trainer: pl.Trainer) -> str | None:
    """The newest checkpoint file written by this run's ModelCheckpoints (or the one it resumed from)."""
    paths = [str(trainer.ckpt_path or "")]
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            paths += [callback.best_model_path, callback.last_model_path]
    found = [Path(p) for p in paths if p and Path(p).is_file()]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None


class ResumeNotice(pl.Callback):
    """Records how far training got (`progress.json` in the run directory, after every step) and warns when a
    fit resumes from a checkpoint older than that: checkpoints are written at epoch ends, so the interrupted
    epoch restarts from its first batch, in the same order (shuffling is seeded by epoch)."""

    def __init__(self) -> None:
        self.path: Path | None = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Find the progress file (every process asks: `log_dir` is a collective) and warn on a partial epoch."""
        log_dir = trainer.log_dir
        self.path = Path(log_dir) / PROGRESS_FILE if log_dir else None
        if not trainer.ckpt_path or self.path is None or not self.path.is_file():
            return
        reached = json.loads(self.path.read_text())
        if reached["step"] > trainer.global_step and trainer.is_global_zero:
            notice(
                f"resuming from {trainer.ckpt_path}, saved at global step {trainer.global_step}; the interrupted run "
                f"had reached epoch {reached['epoch']}, step {reached['step']}. Epoch {trainer.current_epoch} "
                f"restarts from its first batch: the {reached['step'] - trainer.global_step} steps after the "
                "checkpoint are redone with the same data order."
            )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Write the epoch and step reached (atomically: written aside, then renamed)."""
        if self.path is None or not trainer.is_global_zero:
            return
        progress = json.dumps({"epoch": trainer.current_epoch, "step": trainer.global_step})
        atomic_write(self.path, lambda p: p.write_text(progress), durable=False)  # every step: no fsync
