"""FineTuneModule: head shapes, metrics keys, and only trainable parameters reach the optimizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from datamodules.common import ConfigError
from lightning_modules.module import FineTuneModule, build_head


def test_mlp_head_layers() -> None:
    head = build_head(16, 4, hidden=[8, 6], dropout=0.3)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 8), (8, 6), (6, 4)]
    assert sum(isinstance(m, nn.Dropout) and m.p == 0.3 for m in head) == 2
    assert head(torch.rand(5, 16)).shape == (5, 4)


def test_optimizer_gets_only_trainable_params() -> None:
    model = FineTuneModule(backbone="scratch/mlp", weights="none", image_size=8, num_classes=3)
    for p in model.backbone.parameters():
        p.requires_grad = False
    optimizer = model.configure_optimizers()
    assert [g["name"] for g in optimizer.param_groups] == ["head"]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.head.parameters()}


def test_scheduler_is_injected_and_plateau_gets_a_monitor() -> None:
    model = FineTuneModule(
        backbone="scratch/mlp",
        weights="none",
        image_size=8,
        num_classes=3,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max"),
        scheduler_monitor="val/acc",
    )
    config = model.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.SGD)
    assert config["lr_scheduler"]["monitor"] == "val/acc"


def test_class_names_must_match_num_classes() -> None:
    with pytest.raises(ConfigError, match="3 names for 2 classes"):
        FineTuneModule(backbone="scratch/mlp", weights="none", image_size=8, num_classes=2, class_names=["a", "b", "c"])


def test_hparams_are_primitive_for_weights_only_loading() -> None:
    model = FineTuneModule(backbone="scratch/mlp", weights="none", image_size=8, num_classes=2, class_names=["a", "b"])
    primitive = (str, int, float, bool, type(None), list)
    assert all(isinstance(v, primitive) for v in model.hparams.values())


def test_sync_batchnorm_keeps_timm_fused_activations() -> None:
    from lightning_modules.backbones.backbone import build_backbone
    from lightning_modules.module import sync_batchnorm

    backbone = build_backbone("timm/tf_efficientnet_lite0", weights="embedded", image_size=32).eval()
    x = torch.rand(2, 3, 32, 32)
    expected = backbone(x)
    converted = sync_batchnorm(backbone.body).eval()
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    assert torch.allclose(converted(x).flatten(1), expected, atol=1e-6)  # the ReLU6 after each BatchNorm survives


def test_without_a_trainer_a_module_is_one_process_and_keeps_its_batchnorm() -> None:
    from lightning_modules.module import world_size

    model = FineTuneModule(
        backbone="timm/test_resnet", weights="none", image_size=32, num_classes=2, sync_batchnorm=True
    )
    assert world_size(model) == 1
    model.configure_model()  # as scripts/benchmark.py calls it: nothing to synchronise
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


def test_channels_last_keeps_outputs_and_compile_keeps_checkpoint_keys() -> None:
    torch.manual_seed(0)
    plain = FineTuneModule(backbone="timm/test_resnet", weights="none", image_size=32, num_classes=3).eval()
    fast = FineTuneModule(
        backbone="timm/test_resnet", weights="none", image_size=32, num_classes=3, channels_last=True, compile=True
    ).eval()
    fast.load_state_dict(plain.state_dict())
    fast.configure_model()
    conv = next(m for m in fast.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.backbone.body._compiled_call_impl is not None  # compiled in place (runs in scripts/benchmark.py)
    assert list(fast.state_dict()) == list(plain.state_dict())  # so checkpoints load either way
    fast.backbone.body._compiled_call_impl = None  # eager here: compiling takes most of a minute on 2 CPU cores
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), atol=1e-4, rtol=1e-4)
