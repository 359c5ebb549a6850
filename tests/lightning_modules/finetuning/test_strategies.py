"""Every strategy and scheduler across an unfreeze, at the tensor level: flags, groups, learning rates."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from datamodules.common import ConfigError
from lightning_modules.finetuning.strategies import Freeze, Milestones, NoFreeze, select_stages
from lightning_modules.module import FineTuneModule
from tests.helpers.data import tiny_loader
from tests.helpers.models import Recorder, quiet_trainer, tiny_model


def _run(tmp_path: Path, strategy: Any, epochs: int, model: FineTuneModule | None = None) -> Recorder:
    recorder = Recorder()
    quiet_trainer(tmp_path, max_epochs=epochs, callbacks=[strategy, recorder]).fit(
        model or tiny_model(), train_dataloaders=tiny_loader()
    )
    return recorder


def test_freeze_never_unfreezes(tmp_path: Path) -> None:
    rec = _run(tmp_path, Freeze(), epochs=3)
    for epoch in range(3):
        assert [g[0] for g in rec.epochs[epoch]["groups"]] == ["head"]
        assert all(rec.epochs[epoch][s]["requires_grad"] == {False} for s in ("stem", "layer4"))


def test_no_freeze_trains_everything_from_the_start_with_layer_decay(tmp_path: Path) -> None:
    rec = _run(tmp_path, NoFreeze(lr_decay=0.5), epochs=1)
    state = rec.epochs[0]
    names = [g[0] for g in state["groups"]]
    assert names == ["head", "layer4", "layer3", "layer2", "layer1", "stem"]
    lrs = [g[1] for g in state["groups"]]
    assert lrs == pytest.approx([1e-3, 1e-3, 5e-4, 2.5e-4, 1.25e-4, 6.25e-5])
    assert all(state[s]["requires_grad"] == {True} and state[s]["bn_training"] == {True} for s in names[1:])


@pytest.mark.parametrize(
    ("rates", "top"),
    [({"lr": 0.01, "lr_decay": 0.5}, 0.01), ({"lr_factor": 0.5, "lr_decay": 0.25}, 1e-3 * 0.5)],  # AdamW's 1e-3
    ids=["lr", "lr_factor"],
)
def test_milestones_unfreeze_top_down_at_their_rates(tmp_path: Path, rates: dict[str, Any], top: float) -> None:
    rec = _run(tmp_path, Milestones([(1, 1), (2, ["layer3", "layer2"]), (3, -1)], **rates), epochs=4)
    expected = {
        0: ["head"],
        1: ["head", "layer4"],
        2: ["head", "layer4", "layer3", "layer2"],
        3: ["head", "layer4", "layer3", "layer2", "layer1", "stem"],
    }
    depth = {"layer4": 0, "layer3": 1, "layer2": 2, "layer1": 3, "stem": 4}  # stages below the top one
    for epoch, names in expected.items():
        assert [g[0] for g in rec.epochs[epoch]["groups"]] == names
        frozen = {"stem", "layer1", "layer2", "layer3", "layer4"} - set(names)
        assert all(rec.epochs[epoch][s]["requires_grad"] == {False} for s in frozen)
        assert all(rec.epochs[epoch][s]["bn_training"] == {False} for s in frozen)
        # no scheduler: each stage keeps the rate it joined at, the top one's times lr_decay per stage down
        lrs = dict(rec.epochs[epoch]["groups"])
        assert lrs == pytest.approx({"head": 1e-3, **{n: top * rates["lr_decay"] ** depth[n] for n in names[1:]}})


def test_stage_selection_errors() -> None:
    backbone = tiny_model().backbone
    with pytest.raises(ConfigError, match="has no stage 'layer9'"):
        select_stages(backbone, ["layer9"])
    with pytest.raises(ConfigError, match="positive count"):
        select_stages(backbone, 0)
    with pytest.raises(ConfigError, match="increasing, distinct epochs"):
        Milestones([(3, 1), (2, 2)])


SCHEDULERS = {
    "cosine_warmup": lambda opt: torch.optim.lr_scheduler.SequentialLR(
        opt,
        [
            torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=1),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4),
        ],
        milestones=[1],
    ),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=4),
    # mode "max" on a falling loss: a plateau every epoch, so the reduction (and the new group's floor) is exercised
    "plateau": lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=0),
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5**epoch),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_schedulers_keep_working_across_an_unfreeze(tmp_path: Path, name: str) -> None:
    from lightning_modules.finetuning.strategies import FreezeUnfreeze

    model = FineTuneModule(
        backbone="timm/test_resnet",
        weights="none",
        image_size=32,
        num_classes=3,
        optimizer=partial(torch.optim.SGD, lr=0.01, momentum=0.9),
        lr_scheduler=SCHEDULERS[name],
        scheduler_monitor="train/loss_epoch",
    )
    rec = _run(tmp_path, FreezeUnfreeze(unfreeze_at_epoch=1, stages=1, lr_factor=0.1), epochs=4, model=model)
    for epoch in (1, 2, 3):
        (head, head_lr), (stage, stage_lr) = rec.epochs[epoch]["groups"]
        assert (head, stage) == ("head", "layer4")
        # the new group follows the schedule at the ratio it started with: a tenth of the head
        assert stage_lr == pytest.approx(head_lr * 0.1, rel=1e-6), (epoch, head_lr, stage_lr)
    head_lrs = [rec.epochs[e]["groups"][0][1] for e in range(4)]
    assert len(set(head_lrs)) > 1, f"{name} never changed the learning rate: {head_lrs}"


def test_the_supported_schedulers_are_the_tested_ones() -> None:
    from lightning_modules.finetuning.schedulers import SUPPORTED_SCHEDULERS

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    tested = set()
    for factory in SCHEDULERS.values():
        scheduler = factory(optimizer)
        tested |= {type(s) for s in [scheduler, *getattr(scheduler, "_schedulers", [])]}
    assert tested == set(SUPPORTED_SCHEDULERS)


def _with_scheduler(factory: Any, **kwargs: Any) -> FineTuneModule:
    return FineTuneModule(
        backbone="timm/test_resnet",
        weights="none",
        image_size=32,
        num_classes=3,
        optimizer=partial(torch.optim.SGD, lr=0.01),
        lr_scheduler=factory,
        **kwargs,
    )


def test_a_new_group_gets_the_plateau_floor_of_the_head_times_its_ratio(tmp_path: Path) -> None:
    from lightning_modules.finetuning.strategies import FreezeUnfreeze

    # mode "max" with threshold 1 on a positive loss: only the first epoch counts as an improvement, so every
    # later epoch halves the rates, down to min_lr 0.004 for the head
    plateau = partial(torch.optim.lr_scheduler.ReduceLROnPlateau, mode="max", threshold=1.0, factor=0.5, patience=0)
    model = _with_scheduler(partial(plateau, min_lr=0.004), scheduler_monitor="train/loss_epoch")
    rec = _run(tmp_path, FreezeUnfreeze(unfreeze_at_epoch=1, stages=1, lr_factor=0.1), epochs=5, model=model)
    rates = [dict(rec.epochs[e]["groups"]) for e in range(5)]
    assert [r["head"] for r in rates] == pytest.approx([0.01, 0.01, 0.005, 0.004, 0.004])
    # layer4 joins at a tenth of the head (0.001), halves once, then stops at a tenth of the head's floor
    assert [r["layer4"] for r in rates[1:]] == pytest.approx([0.001, 0.0005, 0.0004, 0.0004])


def test_an_untested_scheduler_is_refused_when_a_stage_will_unfreeze(tmp_path: Path) -> None:
    from lightning_modules.finetuning.strategies import FreezeUnfreeze

    exponential = partial(torch.optim.lr_scheduler.ExponentialLR, gamma=0.5)
    restarts = partial(torch.optim.lr_scheduler.CosineAnnealingWarmRestarts, T_0=2)
    for factory, name in ((exponential, "ExponentialLR"), (restarts, "CosineAnnealingWarmRestarts")):
        with pytest.raises(ConfigError, match=f"model.lr_scheduler {name}: .* CosineAnnealingLR, LambdaLR"):
            _run(tmp_path, FreezeUnfreeze(unfreeze_at_epoch=1, stages=1), epochs=2, model=_with_scheduler(factory))
    rec = _run(tmp_path, Freeze(), epochs=2, model=_with_scheduler(exponential))  # never unfreezes: no new groups
    assert rec.epochs[1]["groups"][0][1] == pytest.approx(0.005)


def test_frozen_stages_are_fixed_feature_extractors(tmp_path: Path) -> None:
    """Stochastic depth and dropout inside a frozen stage are off too, not only BatchNorm."""
    from torchvision.ops import StochasticDepth

    from lightning_modules.finetuning.strategies import FreezeUnfreeze

    model = FineTuneModule(backbone="torchvision/efficientnet_b0", weights="none", image_size=32, num_classes=3)
    seen: dict[int, dict[str, bool]] = {}

    class Probe(Recorder):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == 0:
                body = pl_module.backbone.body
                seen[trainer.current_epoch] = {
                    name: any(m.training for m in body.get_submodule(name).modules() if isinstance(m, StochasticDepth))
                    for name in ("features.3", "features.7")
                }

    quiet_trainer(tmp_path, max_epochs=2, callbacks=[FreezeUnfreeze(unfreeze_at_epoch=1, stages=2), Probe()]).fit(
        model, train_dataloaders=tiny_loader()
    )
    assert seen[0] == {"features.3": False, "features.7": False}  # frozen: no stochastic depth
    assert seen[1] == {"features.3": False, "features.7": True}  # features.7 unfrozen: trains normally


class StepSpy(Recorder):
    """Also records each group's rate inside every optimizer step (hooks registered after the strategy's)."""

    def __init__(self) -> None:
        super().__init__()
        self.inside: list[dict[str, float]] = []
        self.after: list[dict[str, float]] = []
        self.hooked = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        optimizer = trainer.optimizers[0]
        if not self.hooked and len(optimizer.param_groups) > 1:
            rates = lambda o: {g["name"]: g["lr"] for g in o.param_groups}  # noqa: E731
            optimizer.register_step_pre_hook(lambda o, a, k: self.inside.append(rates(o)))
            optimizer.register_step_post_hook(lambda o, a, k: self.after.append(rates(o)))
            self.hooked = True


def test_warmup_ramps_a_new_stage_over_steps_and_schedulers_see_the_full_rate(tmp_path: Path) -> None:
    from lightning_modules.finetuning.strategies import FreezeUnfreeze

    model = FineTuneModule(
        backbone="timm/test_resnet",
        weights="none",
        image_size=32,
        num_classes=3,
        optimizer=partial(torch.optim.SGD, lr=0.01),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    )
    spy = StepSpy()
    strategy = FreezeUnfreeze(unfreeze_at_epoch=1, stages=1, lr_factor=0.1, warmup_steps=3)
    quiet_trainer(tmp_path, max_epochs=3, callbacks=[strategy, spy]).fit(model, train_dataloaders=tiny_loader())
    # two steps an epoch; layer4 joins at epoch 1 at a tenth of the head's 0.005, StepLR halves both at epoch 2;
    # the ramp (1/3, 2/3, 3/3) crosses the epoch boundary
    full = [0.0005, 0.0005, 0.00025, 0.00025]
    ramp = [1 / 3, 2 / 3, 1.0, 1.0]
    assert [s["layer4"] for s in spy.inside] == pytest.approx([f * r for f, r in zip(full, ramp, strict=True)])
    assert [s["layer4"] for s in spy.after] == pytest.approx(full)
    assert [s["head"] for s in spy.inside] == pytest.approx([0.005, 0.005, 0.0025, 0.0025])
    assert strategy.warming == {}
    assert strategy.state_dict()["warming"] == {}


def test_warmup_progress_survives_a_checkpoint() -> None:
    from lightning_modules.finetuning.strategies import FreezeUnfreeze

    strategy = FreezeUnfreeze(warmup_steps=5)
    strategy.warming = {"layer4": 2}
    restored = FreezeUnfreeze(warmup_steps=5)
    restored.load_state_dict(strategy.state_dict())
    assert restored.warming == {"layer4": 2}
    with pytest.raises(ConfigError, match=r"FreezeUnfreeze.warmup_steps is -1: allowed \[0, inf\)"):
        FreezeUnfreeze(warmup_steps=-1)
