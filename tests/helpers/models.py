"""Tiny models and trainers: timm's test_resnet with a small head, a quiet Trainer, BatchNorm statistics, a recorder
of what trained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_modules.module import FineTuneModule


def quiet_trainer(root: Path, **kwargs: Any) -> pl.Trainer:
    """A Trainer for tests: no logger, checkpoints, progress bar or summary unless asked for."""
    defaults: dict[str, Any] = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(root),
    }
    return pl.Trainer(**{**defaults, **kwargs})


def tiny_model() -> FineTuneModule:
    """timm's test_resnet at 32 px with a three-class head, no pretrained weights."""
    return FineTuneModule(backbone="timm/test_resnet", weights="none", image_size=32, num_classes=3)


def bn_stats(model: FineTuneModule, stage: str) -> list[torch.Tensor]:
    """Copies of the BatchNorm running means of one backbone stage."""
    backbone = model.backbone
    return [
        m.running_mean.clone()
        for m in backbone.stage_modules(backbone.stage(stage))
        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None
    ]


class Recorder(pl.Callback):
    """Records, at the first batch of each epoch, what trains and how BatchNorm behaves."""

    def __init__(self) -> None:
        self.epochs: dict[int, dict[str, Any]] = {}
        self.at_start: dict[str, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.at_start = self._snapshot(trainer, pl_module)  # after any resume, before any epoch's unfreezing

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not batch_idx:
            self.epochs[trainer.current_epoch] = self._snapshot(trainer, pl_module)

    @staticmethod
    def _snapshot(trainer: pl.Trainer, pl_module: Any) -> dict[str, Any]:
        backbone = pl_module.backbone
        state: dict[str, Any] = {"groups": [(g["name"], g["lr"]) for g in trainer.optimizers[0].param_groups]}
        for stage in backbone.stages:
            params = list(backbone.stage_parameters(stage))
            bns = [m for m in backbone.stage_modules(stage) if isinstance(m, nn.BatchNorm2d)]
            state[stage.name] = {
                "requires_grad": {p.requires_grad for p in params},
                "bn_training": {m.training for m in bns},
                "bn_stats": bn_stats(pl_module, stage.name),
            }
        return state
