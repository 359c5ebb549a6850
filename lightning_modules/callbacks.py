"""Small callbacks: what trains and at which rate, logged once per epoch."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


class TrainingStateLogger(pl.Callback):
    """Logs `lr/<group>` for every param group (`lr/head`, `lr/layer4` ...) and `trainable_params`.

    Logged at the first batch of each epoch, after every finetuning strategy has unfrozen what is due.
    """

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
