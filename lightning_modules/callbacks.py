"""Small callbacks: what trains, at which rate and how long an epoch takes, logged once per epoch."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl


class TrainingStateLogger(pl.Callback):
    """Logs `lr/<group>` for every param group (`lr/head`, `lr/layer4` ...), `trainable_params` and `time/epoch_s`.

    Learning rates and trainable parameters are logged at the first batch of each epoch, after every finetuning
    strategy has unfrozen what is due; `time/epoch_s` is the wall time of the epoch (training and its validation).
    """

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the epoch's clock."""
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the epoch's wall time, `time/epoch_s`."""
        start = getattr(self, "_epoch_start", None)
        if start is not None:
            pl_module.log("time/epoch_s", time.perf_counter() - start, on_step=False, on_epoch=True, batch_size=1)

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
