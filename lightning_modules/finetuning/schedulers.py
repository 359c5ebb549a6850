"""The learning-rate schedulers a finetuning strategy can unfreeze under, and how a new param group joins them."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch.optim import Optimizer, lr_scheduler

from datamodules.common import ConfigError

# Param-group keys that schedulers set per group and that scale with the learning rate (OneCycleLR and others).
SCALED_KEYS = ("initial_lr", "max_lr", "min_lr")
COPIED_KEYS = ("max_momentum", "base_momentum")

# The schedulers whose per-group state `register_new_groups` extends when a stage starts training, each tested
# across an unfreeze (tests/lightning_modules/finetuning/test_strategies.py, SCHEDULERS); any other is refused at
# the start of a fit that will unfreeze, rather than patched blind.
SUPPORTED_SCHEDULERS = (
    lr_scheduler.CosineAnnealingLR,
    lr_scheduler.LambdaLR,
    lr_scheduler.LinearLR,
    lr_scheduler.OneCycleLR,
    lr_scheduler.ReduceLROnPlateau,
    lr_scheduler.SequentialLR,
    lr_scheduler.StepLR,
)


def check_schedulers(trainer: pl.Trainer) -> None:
    """A ConfigError naming the scheduler when one of the fit's is not in `SUPPORTED_SCHEDULERS`."""
    for config in trainer.lr_scheduler_configs:
        for scheduler in [config.scheduler, *getattr(config.scheduler, "_schedulers", [])]:
            if type(scheduler) not in SUPPORTED_SCHEDULERS:
                names = ", ".join(cls.__name__ for cls in SUPPORTED_SCHEDULERS)
                raise ConfigError(
                    f"model.lr_scheduler {type(scheduler).__name__}: the finetuning strategy adds a param group when "
                    f"a stage unfreezes, and only these schedulers are known to carry it: {names}. Use one of "
                    "them, or a strategy that never unfreezes (Freeze)"
                )


def register_new_groups(trainer: pl.Trainer, optimizer: Optimizer, groups: list[dict[str, Any]]) -> None:
    """Tell the optimizer's schedulers about groups added after they were built.

    A new group keeps the ratio to the head group's learning rate at which it started: its scheduler-specific
    keys (initial, max and min lr) and the schedulers' per-group lists are the head's, times that ratio.
    """
    head = optimizer.param_groups[0]
    for group in groups:
        ratio = group["lr"] / head["lr"] if head["lr"] else 1.0
        for key in SCALED_KEYS:
            if key in head:
                group[key] = head[key] * ratio
        for key in COPIED_KEYS:
            if key in head:
                group[key] = head[key]
        for config in trainer.lr_scheduler_configs:
            for scheduler in [config.scheduler, *getattr(config.scheduler, "_schedulers", [])]:
                if getattr(scheduler, "optimizer", None) is not optimizer:
                    continue
                for attr in ("base_lrs", "min_lrs", "_last_lr", "max_lrs"):
                    values = getattr(scheduler, attr, None)
                    if isinstance(values, list) and values:
                        values.append(values[0] * ratio)
                lambdas = getattr(scheduler, "lr_lambdas", None)  # LambdaLR, MultiplicativeLR: the head's rule
                if isinstance(lambdas, list) and lambdas:
                    lambdas.append(lambdas[0])
