"""Finetuning strategies on Lightning's `BaseFinetuning`.

A strategy says which backbone stages train at each epoch (`trainable_stages`) and at what learning rate a
newly unfrozen stage starts (`stage_lr`). The base class does the rest, correctly:

- frozen stages have `requires_grad=False` and their BatchNorm layers stay in eval mode, so their running
  statistics never move (Lightning's own callback leaves them in train mode);
- each newly unfrozen stage joins the optimizer as its own named param group (`layer4`, `blocks.6`);
- which stages are unfrozen is part of the callback's state, so a run resumed after an unfreeze keeps them
  trainable (Lightning's own callback silently refreezes them).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn
from torch.optim import Optimizer

from lightning_modules.backbones import Backbone, Stage
from lightning_modules.errors import ConfigError


class FinetuningStrategy(BaseFinetuning):
    """Template for strategies: override `trainable_stages` (and optionally `stage_lr`).

    Args:
        train_bn: whether BatchNorm layers of *unfrozen* stages train (train mode, affine parameters trainable).
            BatchNorm layers of frozen stages are always in eval mode with their statistics untouched.
    """

    def __init__(self, train_bn: bool = True) -> None:
        super().__init__()
        self.train_bn = train_bn
        self.unfrozen: list[str] = []

    def trainable_stages(self, backbone: Backbone, epoch: int) -> list[Stage]:
        """Stages that should be trainable during `epoch` (cumulative: a stage once unfrozen stays so)."""
        raise NotImplementedError

    def stage_lr(self, stage: Stage, optimizer: Optimizer) -> float:
        """Starting learning rate of a newly unfrozen stage; default: the head's current rate."""
        return float(optimizer.param_groups[0]["lr"])

    # ---------------------------------------------------------------------------------- BaseFinetuning hooks

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        """Freeze every backbone stage that is not already unfrozen (the latter only on resume)."""
        backbone = _backbone(pl_module)
        for stage in backbone.stages:
            self._set_trainable(backbone, stage, stage.name in self.unfrozen)

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        """Unfreeze the stages due at this epoch, each as a new named param group."""
        backbone = _backbone(pl_module)
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for stage in self.trainable_stages(backbone, epoch):
            if stage.name in self.unfrozen:
                continue
            self._set_trainable(backbone, stage, True)
            params = [p for p in backbone.stage_parameters(stage) if p.requires_grad and id(p) not in in_optimizer]
            if params:
                optimizer.add_param_group({"name": stage.name, "params": params, "lr": self.stage_lr(stage, optimizer)})
            self.unfrozen.append(stage.name)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Unfreeze what is due, then put frozen BatchNorm layers back in eval mode and log the trainable count."""
        before = [len(opt.param_groups) for opt in trainer.optimizers]
        super().on_train_epoch_start(trainer, pl_module)
        for optimizer, count in zip(trainer.optimizers, before, strict=True):
            register_new_groups(trainer, optimizer, optimizer.param_groups[count:])
        self.apply_bn_policy(_backbone(pl_module))
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        pl_module.log("trainable_params", float(trainable), on_step=False, on_epoch=True)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """On resume, restore the param groups (base class) and the trainable flags of unfrozen stages."""
        super().on_fit_start(trainer, pl_module)
        self.freeze_before_training(pl_module)

    def state_dict(self) -> dict[str, Any]:
        """Param-group metadata (base class) plus the names of the unfrozen stages."""
        return {**super().state_dict(), "unfrozen": list(self.unfrozen)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what `state_dict` saved."""
        super().load_state_dict(state_dict)
        self.unfrozen = list(state_dict.get("unfrozen", []))

    # ---------------------------------------------------------------------------------- helpers

    def apply_bn_policy(self, backbone: Backbone) -> None:
        """Eval mode for BatchNorm in frozen stages (and in unfrozen ones when `train_bn` is False)."""
        for stage in backbone.stages:
            trains = stage.name in self.unfrozen and self.train_bn
            for module in backbone.stage_modules(stage):
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.train(trains and backbone.training)

    def _set_trainable(self, backbone: Backbone, stage: Stage, trainable: bool) -> None:
        bn_params = {
            id(p)
            for m in backbone.stage_modules(stage)
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for p in m.parameters(recurse=False)
        }
        for p in backbone.stage_parameters(stage):
            p.requires_grad = trainable and (self.train_bn or id(p) not in bn_params)


class FreezeUnfreeze(FinetuningStrategy):
    """Train the head alone, then from `unfreeze_at_epoch` on also the top `stages` of the backbone.

    Args:
        unfreeze_at_epoch: first epoch (0-based) at which the stages train; `null` keeps the backbone frozen.
        stages: how many stages to unfreeze, counted from the top (-1: all), or a list of stage names.
        lr: starting learning rate of the unfrozen stages; default: the head's rate times `lr_factor`.
        lr_factor: used when `lr` is not given.
        train_bn: whether BatchNorm layers of unfrozen stages train.
    """

    def __init__(
        self,
        unfreeze_at_epoch: int | None = 1,
        stages: int | list[str] = -1,
        lr: float | None = None,
        lr_factor: float = 0.1,
        train_bn: bool = True,
    ) -> None:
        super().__init__(train_bn=train_bn)
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.stages = stages
        self.lr = lr
        self.lr_factor = lr_factor

    def trainable_stages(self, backbone: Backbone, epoch: int) -> list[Stage]:
        """The selected stages from `unfreeze_at_epoch` on, none before."""
        if self.unfreeze_at_epoch is None or epoch < self.unfreeze_at_epoch:
            return []
        return select_stages(backbone, self.stages)

    def stage_lr(self, stage: Stage, optimizer: Optimizer) -> float:
        """`lr` if given, else the head's current rate times `lr_factor`."""
        return self.lr if self.lr is not None else float(optimizer.param_groups[0]["lr"]) * self.lr_factor


def register_new_groups(trainer: pl.Trainer, optimizer: Optimizer, groups: list[dict[str, Any]]) -> None:
    """Tell the optimizer's schedulers about groups added after they were built.

    Each new group starts at its own learning rate and from then on follows the schedule's shape (cosine,
    step and one-cycle factors apply to it as to the others); ReduceLROnPlateau gets a floor for it.
    """
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if scheduler.optimizer is not optimizer:
            continue
        for group in groups:
            group.setdefault("initial_lr", group["lr"])
            if hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs.append(group["initial_lr"])
            if hasattr(scheduler, "min_lrs"):
                scheduler.min_lrs.append(scheduler.min_lrs[-1] if scheduler.min_lrs else 0.0)
            if hasattr(scheduler, "_last_lr"):
                scheduler._last_lr.append(group["lr"])


def select_stages(backbone: Backbone, stages: int | list[str]) -> list[Stage]:
    """Stages by count from the top (-1 or a count past the total: all) or by names, top first."""
    if isinstance(stages, int):
        if stages == 0 or stages < -1:
            raise ConfigError(f"stages must be a positive count, -1 for all, or a list of names; got {stages}")
        chosen = backbone.stages if stages == -1 else backbone.stages[-stages:]
        return list(reversed(chosen))
    return [backbone.stage(name) for name in stages]


def _backbone(pl_module: pl.LightningModule) -> Backbone:
    backbone = getattr(pl_module, "backbone", None)
    if not isinstance(backbone, Backbone):
        raise ConfigError("finetuning strategies need a module with a `backbone` built by build_backbone")
    return backbone
