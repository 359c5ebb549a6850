"""FreezeUnfreeze at the tensor level: requires_grad, BatchNorm mode and statistics, param groups, resume."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

from datamodules.common import ConfigError
from lightning_modules.finetuning.strategies import FreezeUnfreeze, check_strategy
from lightning_modules.module import FineTuneModule
from tests.helpers.data import tiny_loader
from tests.helpers.models import Recorder, bn_stats, quiet_trainer, tiny_model


def _fit(tmp_path: Path, callback: pl.Callback, epochs: int, model: FineTuneModule | None = None) -> tuple:
    model = model or tiny_model()
    recorder = Recorder()
    trainer = quiet_trainer(tmp_path, max_epochs=epochs, callbacks=[callback, recorder])
    trainer.fit(model, train_dataloaders=tiny_loader())
    return model, recorder, trainer


def test_frozen_phase_freezes_params_and_batchnorm(tmp_path: Path) -> None:
    model = tiny_model()
    before = {s.name: bn_stats(model, s.name) for s in model.backbone.stages}
    model, rec, _ = _fit(tmp_path, FreezeUnfreeze(unfreeze_at_epoch=None), epochs=2, model=model)
    for epoch in (0, 1):
        state = rec.epochs[epoch]
        assert state["groups"] == [("head", pytest.approx(1e-3))]
        for stage in model.backbone.stage_names():
            assert state[stage]["requires_grad"] == {False}
            assert state[stage]["bn_training"] == {False}, "frozen BatchNorm must be in eval mode"
    for stage, stats in before.items():  # running statistics never moved
        for old, new in zip(stats, bn_stats(model, stage), strict=True):
            assert torch.equal(old, new), stage
    assert all(p.requires_grad for p in model.head.parameters())


def test_unfreeze_adds_named_groups_with_their_lr(tmp_path: Path) -> None:
    model = tiny_model()
    stem_before = bn_stats(model, "stem")
    layer4_before = bn_stats(model, "layer4")
    model, rec, trainer = _fit(tmp_path, FreezeUnfreeze(unfreeze_at_epoch=1, stages=2, lr=0.01), epochs=2, model=model)
    assert rec.epochs[0]["layer4"]["requires_grad"] == {False}
    state = rec.epochs[1]
    assert state["groups"] == [("head", pytest.approx(1e-3)), ("layer4", 0.01), ("layer3", 0.01)]
    for stage in ("layer3", "layer4"):
        assert state[stage]["requires_grad"] == {True}
        assert state[stage]["bn_training"] == {True}
    for stage in ("stem", "layer1", "layer2"):
        assert state[stage]["requires_grad"] == {False}
        assert state[stage]["bn_training"] == {False}
    assert all(torch.equal(a, b) for a, b in zip(stem_before, bn_stats(model, "stem"), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(layer4_before, bn_stats(model, "layer4"), strict=True))
    groups = trainer.optimizers[0].param_groups
    assert sum(len(g["params"]) for g in groups) == len({id(p) for g in groups for p in g["params"]})


def test_default_lr_is_head_lr_times_factor_and_train_bn_false_keeps_bn_frozen(tmp_path: Path) -> None:
    _, rec, _ = _fit(tmp_path, FreezeUnfreeze(unfreeze_at_epoch=1, stages=["layer2"], lr_factor=0.5, train_bn=False), 2)
    state = rec.epochs[1]
    assert state["groups"][1] == ("layer2", pytest.approx(5e-4))
    assert state["layer2"]["bn_training"] == {False}
    assert state["layer2"]["requires_grad"] == {True, False}  # convs train, BatchNorm affine stays frozen


def test_resume_after_unfreeze_keeps_stages_trainable(tmp_path: Path) -> None:
    ckpt = tmp_path / "after_unfreeze.ckpt"
    _, _, trainer = _fit(tmp_path, FreezeUnfreeze(unfreeze_at_epoch=1, stages=1, lr=0.01), epochs=2)
    trainer.save_checkpoint(ckpt)
    model = tiny_model()
    recorder = Recorder()
    resumed = quiet_trainer(
        tmp_path, max_epochs=3, callbacks=[FreezeUnfreeze(unfreeze_at_epoch=1, stages=1, lr=0.01), recorder]
    )
    resumed.fit(model, train_dataloaders=tiny_loader(), ckpt_path=ckpt)
    start = recorder.at_start  # restored from the checkpoint, not re-unfrozen by the epoch-2 schedule
    assert start["groups"] == [("head", pytest.approx(1e-3)), ("layer4", 0.01)]
    assert start["layer4"]["requires_grad"] == {True} and start["layer3"]["requires_grad"] == {False}
    state = recorder.epochs[2]
    assert state["groups"] == [("head", pytest.approx(1e-3)), ("layer4", 0.01)]
    assert state["layer4"]["requires_grad"] == {True}
    assert state["layer3"]["requires_grad"] == {False}


def test_only_ddp_among_multi_process_strategies_may_unfreeze() -> None:
    with pytest.raises(ConfigError, match=r"trainer.strategy FSDPStrategy: .* supported on one device and on DDP"):
        check_strategy(SimpleNamespace(strategy=FSDPStrategy()))  # type: ignore[arg-type]
    for fine in (DDPStrategy(), SingleDeviceStrategy(torch.device("cpu"))):
        check_strategy(SimpleNamespace(strategy=fine))  # type: ignore[arg-type]
