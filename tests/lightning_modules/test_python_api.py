"""The Python API outside the CLI: model and data link themselves (classes one way, preprocessing the other) or
fail with one clear error; a plain Trainer gets `ftlab`'s defaults; a checkpoint loads without the network."""

from __future__ import annotations

import socket
import urllib.error
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

import lightning_modules
from datamodules import ImageFolderDataModule
from datamodules.common import ConfigError
from lightning_modules import BestCheckpoint, FeatureCache, FineTuneModule, Freeze, NoFreeze
from lightning_modules import TestReport as ReportCallback  # a name pytest does not collect as a test class
from lightning_modules.backbones.backbone import SOURCES, build_backbone, source
from tests.helpers.data import write_class_folders

SMALL: dict[str, Any] = {"backbone": "timm/test_resnet", "weights": "none", "image_size": 32}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    write_class_folders(tmp_path / "imgs", {"cat": 6, "dog": 6, "fox": 6})
    return tmp_path / "imgs"


def _fit(model: FineTuneModule, data: Any, root: Path, **kwargs: Any) -> pl.Trainer:
    trainer = pl.Trainer(
        **lightning_modules.trainer_defaults(
            Freeze(), save_dir=str(root / "runs"), max_epochs=1, enable_progress_bar=False, **kwargs
        )
    )
    trainer.fit(model, datamodule=data)
    return trainer


def test_the_public_api_is_importable_from_the_package() -> None:
    for name in lightning_modules.__all__:
        assert getattr(lightning_modules, name).__module__.startswith("lightning_modules."), name


def test_a_model_without_classes_takes_the_datas_and_the_data_the_models_preprocessing(
    folder: Path, tmp_path: Path
) -> None:
    data = ImageFolderDataModule(root=str(folder), batch_size=4, num_workers=0)
    model = FineTuneModule(**SMALL)
    assert data.data_config.input_size == (3, 224, 224)  # nothing linked yet
    _fit(model, data, tmp_path)
    assert model.class_names == ["cat", "dog", "fox"] and model.hparams["num_classes"] == 3
    assert data.data_config == model.data_config and data.data_config.input_size == (3, 32, 32)
    assert next(iter(data.val_dataloader())).inputs.shape[-2:] == (32, 32)


@pytest.mark.parametrize(
    ("model_kwargs", "data_kwargs", "message"),
    [
        ({"num_classes": 2}, {}, r"the model has 2 classes \(0, 1\) and the data 3 \(cat, dog, fox\)"),
        (
            {"class_names": ["fox", "dog", "cat"]},
            {},
            r"the model's class names fox, dog, cat differ from the data's cat, dog, fox",
        ),
        (
            {},
            {"data_config": {"input_size": [3, 224, 224], "mean": [0.5] * 3, "std": [0.5] * 3}},
            r"data_config of the DataModule \(3x224x224, bilinear.*differs from the model's backbone \(3x32x32",
        ),
    ],
    ids=["class count", "class names", "image size"],
)
def test_model_and_data_that_disagree_fail_before_training(
    folder: Path, tmp_path: Path, model_kwargs: dict[str, Any], data_kwargs: dict[str, Any], message: str
) -> None:
    data = ImageFolderDataModule(root=str(folder), batch_size=4, num_workers=0, **data_kwargs)
    model = FineTuneModule(**SMALL, **model_kwargs)
    with pytest.raises(ConfigError, match=message):
        _fit(model, data, tmp_path)


def test_trainer_defaults_are_the_clis(folder: Path, tmp_path: Path) -> None:
    kwargs = lightning_modules.trainer_defaults(NoFreeze(), save_dir=str(tmp_path / "runs"), name="nb", max_epochs=2)
    kinds = [type(c) for c in kwargs["callbacks"]]
    assert {BestCheckpoint, EarlyStopping, FeatureCache, ReportCallback, NoFreeze} <= set(kinds)
    best = next(c for c in kwargs["callbacks"] if isinstance(c, BestCheckpoint))
    assert (best.monitor, best.mode) == ("val/acc", "max") and kwargs["max_epochs"] == 2
    tb, csv = kwargs["logger"]
    assert isinstance(tb, TensorBoardLogger) and isinstance(csv, CSVLogger) and tb.log_dir == csv.log_dir
    assert Path(tb.log_dir) == tmp_path / "runs" / "nb" / "version_0"


def test_a_pretrained_backbone_without_a_strategy_warns(folder: Path, tmp_path: Path) -> None:
    data = ImageFolderDataModule(root=str(folder), batch_size=4, num_workers=0)
    model = FineTuneModule(backbone="timm/test_resnet", weights="pretrained", image_size=32, load_weights=False)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.warns(UserWarning, match=r"no finetuning strategy .* all [\d,]+ parameters of the pretrained backbone"):
        trainer.fit(model, datamodule=data)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every attempt to download (torch.hub's urlopen) or to open a connection fails, and is recorded."""
    attempts: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args)
        raise urllib.error.URLError("network disabled by the test")

    monkeypatch.setattr("torch.hub.urlopen", refuse)
    monkeypatch.setattr("torch.hub.get_dir", lambda: "/nonexistent/hub")  # no cached copy either
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def test_a_pretrained_checkpoint_loads_offline_without_a_download(
    folder: Path, tmp_path: Path, no_network: list[Any]
) -> None:
    """A run made with `weights: pretrained` (its checkpoint says so) loads with networking disabled: the checkpoint
    holds every weight. Asked to load the configured weights too, the same call reaches for the network."""
    data = ImageFolderDataModule(root=str(folder), batch_size=4, num_workers=0)
    model = FineTuneModule(backbone="torchvision/resnet18", weights="pretrained", image_size=32, load_weights=False)
    trainer = _fit(model, data, tmp_path, limit_train_batches=1)
    path = trainer.checkpoint_callback.best_model_path  # type: ignore[union-attr]
    loaded = FineTuneModule.load_from_checkpoint(path, weights_only=True)
    assert no_network == [] and loaded.hparams["weights"] == "pretrained" and loaded.class_names == data.class_names
    trained = model.state_dict()
    assert all(torch.equal(v, trained[k].cpu()) for k, v in loaded.state_dict().items())
    with pytest.raises(ConfigError, match="could not download torchvision/resnet18 weights IMAGENET1K_V1"):
        FineTuneModule.load_from_checkpoint(path, weights_only=True, load_weights=True)
    assert no_network, "loading the configured weights should have tried the network"


@pytest.mark.parametrize("prefix", SOURCES)
def test_every_backbone_source_builds_its_example(prefix: str) -> None:
    """The registry test: each module of `backbones/sources/` builds its `EXAMPLE` offline, with stages covering
    every parameter, a data config and features; a new source is tested the day it is added."""
    module, _ = source(f"{prefix}/x")
    backbone = build_backbone(f"{prefix}/{module.EXAMPLE}", "none", image_size=32)
    assert backbone.stages and backbone.data_config.input_size == (3, 32, 32)
    assert backbone(torch.zeros(2, 3, 32, 32)).shape == (2, backbone.num_features)
