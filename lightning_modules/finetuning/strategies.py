"""Finetuning strategies on Lightning's `BaseFinetuning`.

A strategy says which backbone stages train at each epoch (`trainable_stages`). The base class does the rest:

- frozen stages have `requires_grad=False` and their BatchNorm layers stay in eval mode, so their running
  statistics never move (Lightning's own callback leaves them in train mode);
- each newly trainable stage joins the optimizer as its own named param group (`layer4`, `blocks.6`) at
  `lr` (default: the head's rate times `lr_factor`), times `lr_decay` per stage going down the network;
- schedulers learn about the new groups: a group keeps, for the rest of training, the ratio to the head's
  learning rate at which it started (cosine, step, one-cycle and plateau all scale it like the head);
- which stages are unfrozen is part of the callback's state, so a run resumed after an unfreeze keeps them
  trainable with their groups and rates (Lightning's own callback silently refreezes them);
- under DDP the model is re-wrapped after an unfreeze, so the new parameters are synchronised too
  (`rewrap_ddp`, the one place that touches the strategy's wrapper); other multi-process strategies (FSDP,
  DeepSpeed) are refused at the start of a fit that would unfreeze (`check_strategy`).
"""

from __future__ import annotations

import sys
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from datamodules.common import ConfigError, check_range
from lightning_modules.backbones.backbone import Backbone
from lightning_modules.backbones.stages import Stage
from lightning_modules.finetuning.ddp import check_strategy, rewrap_ddp
from lightning_modules.finetuning.schedulers import check_schedulers, register_new_groups


class FinetuningStrategy(BaseFinetuning):
    """Template for strategies: override `trainable_stages`.

    Args:
        lr: starting learning rate of the top unfrozen stage; default: the head's current rate times `lr_factor`.
        lr_factor: used when `lr` is not given.
        lr_decay: factor per stage going down the network (timm's layer decay; 0.1 over 2 stages is fastai's
            `slice(lr/100, lr)`); 1.0 gives every stage the same rate.
        train_bn: whether BatchNorm layers of *unfrozen* stages train (train mode, affine parameters trainable).
            BatchNorm layers of frozen stages are always in eval mode with their statistics untouched.
        warmup_steps: a newly unfrozen stage's rate ramps up linearly over this many optimizer steps (1/n of its
            rate at the first step, all of it at the n-th). Adam's first steps move every new weight by about
            the full rate whatever its gradient; a ramp keeps them from wrecking pretrained features (measured
            on the demo: see experiments/quickstart.yaml). The scheduler and the `lr/<group>` log see the
            unramped rate. 0: no ramp.
    """

    def __init__(
        self,
        lr: float | None = None,
        lr_factor: float = 1.0,
        lr_decay: float = 1.0,
        train_bn: bool = True,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_range(f"{name}.lr", lr, 0, low_open=True, null="the head's rate x lr_factor")
        check_range(f"{name}.lr_factor", lr_factor, 0, low_open=True)
        check_range(f"{name}.lr_decay", lr_decay, 0, 1, low_open=True)
        check_range(f"{name}.warmup_steps", warmup_steps, 0)
        self.lr = lr
        self.lr_factor = lr_factor
        self.lr_decay = lr_decay
        self.train_bn = train_bn
        self.warmup_steps = warmup_steps
        self.unfrozen: list[str] = []
        self.warming: dict[str, int] = {}  # group name -> optimizer steps it has taken while its rate ramps up
        self._hooked: set[int] = set()

    def trainable_stages(self, backbone: Backbone, epoch: int) -> list[Stage]:
        """Stages that should be trainable during `epoch` (cumulative: a stage once unfrozen stays so)."""
        raise NotImplementedError

    def schedule(self, backbone: Backbone, epochs: int) -> list[tuple[int, list[str]]]:
        """The epochs, among the first `epochs`, at which stages become trainable, with their names (top first)."""
        changes: list[tuple[int, list[str]]] = []
        seen: set[str] = set()  # the plan from the first epoch, whatever a resumed run has unfrozen
        for epoch in range(epochs):
            new = [s.name for s in self.trainable_stages(backbone, epoch) if s.name not in seen]
            if new:
                changes.append((epoch, new))
                seen.update(new)
        return changes

    def describe(self, backbone: Backbone, epochs: int) -> str:
        """What trains when and at which rate, in one line: `epoch 0: head only; from epoch 1: + 3 of 9 stages
        (blocks.5, blocks.6, conv_head) at the head's rate x 0.1`."""
        total = len(backbone.stages)
        rate = f"lr {self.lr:g}" if self.lr is not None else f"the head's rate x {self.lr_factor:g}"
        rate += f", x {self.lr_decay:g} per stage down" if self.lr_decay != 1 else ""
        changes = self.schedule(backbone, epochs)
        parts = [] if changes and changes[0][0] == 0 else ["head only (backbone frozen)"]
        if parts and changes:
            parts[0] = f"epochs 0-{changes[0][0] - 1}: head only" if changes[0][0] > 1 else "epoch 0: head only"
        for epoch, names in changes:
            shown = ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
            count = f"all {total} stages" if len(names) == total else f"{len(names)} of {total} stages"
            parts.append(f"from epoch {epoch}: + {count} ({shown}) at {rate}")
        return f"{type(self).__name__}: " + "; ".join(parts)

    def stage_lr(self, backbone: Backbone, stage: Stage, head_lr: float) -> float:
        """Starting learning rate of a newly unfrozen stage."""
        top = self.lr if self.lr is not None else head_lr * self.lr_factor
        depth = len(backbone.stages) - 1 - backbone.stages.index(stage)  # 0 for the top stage
        return top * self.lr_decay**depth

    # ---------------------------------------------------------------------------------- BaseFinetuning hooks

    @override
    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        """Freeze every backbone stage that is not already unfrozen (the latter only on resume)."""
        backbone = backbone_of(pl_module)
        for stage in backbone.stages:
            self._set_trainable(backbone, stage, stage.name in self.unfrozen)

    @override
    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        """Unfreeze the stages due at this epoch, each as a new named param group."""
        backbone = backbone_of(pl_module)
        in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
        head_lr = float(optimizer.param_groups[0]["lr"])
        for stage in self.trainable_stages(backbone, epoch):
            if stage.name in self.unfrozen:
                continue
            self._set_trainable(backbone, stage, True)
            params = [p for p in backbone.stage_parameters(stage) if p.requires_grad and id(p) not in in_optimizer]
            if params:
                lr = self.stage_lr(backbone, stage, head_lr)
                optimizer.add_param_group({"name": stage.name, "params": params, "lr": lr})
                if self.warmup_steps:
                    self.warming[stage.name] = 0
            self.unfrozen.append(stage.name)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        """While a stage warms up, ramp its rate around each optimizer step (hooks on the optimizer: they run
        before the step and after it, so step- and epoch-interval schedulers only ever see the full rate)."""
        if not self.warming:
            return
        for optimizer in trainer.optimizers:
            if id(optimizer) not in self._hooked:
                optimizer.register_step_pre_hook(self.ramp_down)
                optimizer.register_step_post_hook(self.ramp_up)
                self._hooked.add(id(optimizer))

    def ramp_down(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        """Before a step: each warming group at (steps taken + 1) / warmup_steps of its rate."""
        for group in optimizer.param_groups:
            taken = self.warming.get(group.get("name", ""))
            if taken is not None:
                group["full_lr"] = group["lr"]
                group["lr"] = group["lr"] * (taken + 1) / self.warmup_steps

    def ramp_up(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        """After a step: the full rates back; a group that has taken `warmup_steps` steps stops warming."""
        for group in optimizer.param_groups:
            full = group.pop("full_lr", None)
            if full is not None:
                group["lr"] = full
                name = group["name"]
                self.warming[name] += 1
                if self.warming[name] >= self.warmup_steps:
                    del self.warming[name]

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Unfreeze what is due, tell schedulers and DDP, and put frozen BatchNorm layers back in eval mode."""
        before = [len(opt.param_groups) for opt in trainer.optimizers]
        super().on_train_epoch_start(trainer, pl_module)
        added = False
        for optimizer, count in zip(trainer.optimizers, before, strict=True):
            register_new_groups(trainer, optimizer, optimizer.param_groups[count:])
            added = added or len(optimizer.param_groups) > count
        if added:
            rewrap_ddp(trainer)
        self.apply_bn_policy(backbone_of(pl_module))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check every stage the strategy will ever unfreeze now: a wrong name fails at start, not at its epoch."""
        self.trainable_stages(backbone_of(pl_module), sys.maxsize)
        super().setup(trainer, pl_module, stage)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse a scheduler that new param groups would break; on resume, restore the param groups (base class)
        and the trainable flags of unfrozen stages."""
        horizon = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1000
        if any(self.trainable_stages(backbone_of(pl_module), epoch) for epoch in range(horizon)):
            check_schedulers(trainer)
            check_strategy(trainer)
        super().on_fit_start(trainer, pl_module)
        self.freeze_before_training(pl_module)
        if self.unfrozen:
            rewrap_ddp(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        """Param-group metadata (base class) plus the names of the unfrozen stages."""
        return {**super().state_dict(), "unfrozen": list(self.unfrozen), "warming": dict(self.warming)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what `state_dict` saved."""
        super().load_state_dict(state_dict)
        self.unfrozen = list(state_dict.get("unfrozen", []))
        self.warming = dict(state_dict.get("warming", {}))

    def prepare(self, pl_module: pl.LightningModule, epoch: int = 0) -> None:
        """Set the trainable flags this strategy gives the backbone at `epoch`, without an optimizer (for tools
        that train outside the callbacks, such as Lightning's learning-rate finder)."""
        backbone = backbone_of(pl_module)
        due = {s.name for s in self.trainable_stages(backbone, epoch)} | set(self.unfrozen)
        for stage in backbone.stages:
            self._set_trainable(backbone, stage, stage.name in due)

    # ---------------------------------------------------------------------------------- helpers

    def apply_bn_policy(self, backbone: Backbone) -> None:
        """A frozen stage that is one module (`layer4`, `features.3`) is wholly in eval mode: BatchNorm statistics,
        dropout and stochastic depth all off, a fixed feature extractor. Otherwise BatchNorm is in eval mode in
        frozen stages, and in unfrozen ones when `train_bn` is False."""
        for stage in backbone.stages:
            unfrozen = stage.name in self.unfrozen
            module = _submodule(backbone.body, stage.name)
            if module is not None:
                module.train(unfrozen and backbone.training)
            for m in backbone.stage_modules(stage):
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train(unfrozen and self.train_bn and backbone.training)

    def _set_trainable(self, backbone: Backbone, stage: Stage, trainable: bool) -> None:
        bn_params = {
            id(p)
            for m in backbone.stage_modules(stage)
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for p in m.parameters(recurse=False)
        }
        for p in backbone.stage_parameters(stage):
            p.requires_grad = trainable and (self.train_bn or id(p) not in bn_params)


class Freeze(FinetuningStrategy):
    """Linear probing: the backbone stays frozen (BatchNorm in eval mode); only the head trains."""

    @override
    def trainable_stages(self, backbone: Backbone, epoch: int) -> list[Stage]:
        """None, ever."""
        return []


class NoFreeze(FinetuningStrategy):
    """Everything trains from the first epoch; each stage is its own group (for `lr_decay`)."""

    @override
    def trainable_stages(self, backbone: Backbone, epoch: int) -> list[Stage]:
        """All stages, top first."""
        return select_stages(backbone, -1)


class FreezeUnfreeze(FinetuningStrategy):
    """Train the head alone, then from `unfreeze_at_epoch` on also the top `stages` of the backbone.

    Args:
        unfreeze_at_epoch: first epoch (0-based) at which the stages train; `null` keeps the backbone frozen.
        stages: how many stages to unfreeze, counted from the top (-1: all), or a list of stage names.
        lr_factor: the unfrozen stages start at the head's rate times this (default 0.1), unless `lr` is given.
        lr, lr_decay, train_bn, warmup_steps: see `FinetuningStrategy`.
    """

    def __init__(
        self,
        unfreeze_at_epoch: int | None = 1,
        stages: int | list[str] = -1,
        lr: float | None = None,
        lr_factor: float = 0.1,
        lr_decay: float = 1.0,
        train_bn: bool = True,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__(lr=lr, lr_factor=lr_factor, lr_decay=lr_decay, train_bn=train_bn, warmup_steps=warmup_steps)
        check_range("FreezeUnfreeze.unfreeze_at_epoch", unfreeze_at_epoch, 0, null="the backbone stays frozen")
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.stages = stages

    @override
    def trainable_stages(self, backbone: Backbone, epoch: int) -> list[Stage]:
        """The selected stages from `unfreeze_at_epoch` on, none before."""
        if self.unfreeze_at_epoch is None or epoch < self.unfreeze_at_epoch:
            return []
        return select_stages(backbone, self.stages)


class Milestones(FinetuningStrategy):
    """Gradual unfreezing from the top down: `[[epoch, stages], ...]`, e.g. `[[2, 1], [4, 3], [6, -1]]`.

    Args:
        milestones: at each epoch, the top `stages` (a count, -1 for all, or names) become trainable too.
        lr_factor: new stages start at the head's rate times this (default 0.1), unless `lr` is given.
        lr, lr_decay, train_bn, warmup_steps: see `FinetuningStrategy`.
    """

    def __init__(
        self,
        milestones: list[tuple[int, int | list[str]]],
        lr: float | None = None,
        lr_factor: float = 0.1,
        lr_decay: float = 1.0,
        train_bn: bool = True,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__(lr=lr, lr_factor=lr_factor, lr_decay=lr_decay, train_bn=train_bn, warmup_steps=warmup_steps)
        epochs = [int(m[0]) for m in milestones]
        if epochs != sorted(epochs) or len(set(epochs)) != len(epochs):
            raise ConfigError(f"milestones must have increasing, distinct epochs; got {epochs}")
        self.milestones = [(int(e), s) for e, s in milestones]

    @override
    def trainable_stages(self, backbone: Backbone, epoch: int) -> list[Stage]:
        """Every stage named by a milestone at or before `epoch`, top first."""
        chosen: list[Stage] = []
        for at, stages in self.milestones:
            if at <= epoch:
                chosen += [s for s in select_stages(backbone, stages) if s not in chosen]
        return chosen


def select_stages(backbone: Backbone, stages: int | list[str]) -> list[Stage]:
    """Stages by count from the top (-1 or a count past the total: all) or by names; top first."""
    if isinstance(stages, int):
        if stages == 0 or stages < -1:
            raise ConfigError(f"stages must be a positive count, -1 for all, or a list of names; got {stages}")
        chosen = backbone.stages if stages == -1 else backbone.stages[-stages:]
        return list(reversed(chosen))
    order = {s.name: i for i, s in enumerate(backbone.stages)}
    return sorted((backbone.stage(name) for name in stages), key=lambda s: -order[s.name])


def _submodule(body: nn.Module, name: str) -> nn.Module | None:
    try:
        return body.get_submodule(name)
    except AttributeError:  # a stage of loose parameters (`stem`), not one module
        return None


def backbone_of(pl_module: pl.LightningModule) -> Backbone:
    """The module's `Backbone` (what strategies and the feature cache work on), or a ConfigError."""
    backbone = getattr(pl_module, "backbone", None)
    if not isinstance(backbone, Backbone):
        raise ConfigError("finetuning strategies need a module with a `backbone` built by build_backbone")
    return backbone
