"""DigitsDataModule: stratified seeded splits, input size and channels from the data config, real learning."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from datamodules import DigitsDataModule
from datamodules.common import ConfigError
from datamodules.datasets import Concat, TensorImages
from datamodules.splits import kfold_split
from lightning_modules.backbones.backbone import data_config_dict
from lightning_modules.module import FineTuneModule
from tests.helpers.models import quiet_trainer


def _dm(**kwargs: object) -> DigitsDataModule:
    dm = DigitsDataModule(num_workers=0, **kwargs)  # type: ignore[arg-type]
    dm.setup()
    return dm


def _indices(dm: DigitsDataModule, split: str) -> list[int]:
    subset: Any = dm.datasets[split].dataset
    indices = subset.indices
    parent = subset.dataset
    return [parent.indices[i] for i in indices] if hasattr(parent, "indices") else list(indices)


def test_splits_are_disjoint_complete_stratified_and_seeded() -> None:
    dm = _dm(data_config=data_config_dict("scratch/mlp", "none", 8, 1))
    sizes = {s: len(dm.datasets[s]) for s in ("train", "val", "test")}  # type: ignore[arg-type]
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == 360  # 20% of 1,797
    ids = {s: set(_indices(dm, s)) for s in ("train", "val", "test")}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    test_counts: Counter[int] = Counter(dm.datasets["test"].dataset.targets)  # type: ignore[attr-defined]
    assert set(test_counts) == set(range(10)) and max(test_counts.values()) - min(test_counts.values()) <= 2
    assert _indices(_dm(data_config=data_config_dict("scratch/mlp", "none", 8, 1)), "test") == _indices(dm, "test")
    assert _indices(_dm(split_seed=7), "test") != _indices(dm, "test")


def test_images_follow_the_backbone_data_config() -> None:
    dm = _dm(data_config=data_config_dict("timm/tf_efficientnet_lite0", "embedded", 48))
    batch = next(iter(dm.train_dataloader()))
    x, y = batch.inputs, batch.targets
    assert batch.skipped == [] and batch.split == "train" and not batch.features
    assert x.shape == (32, 3, 48, 48) and x.dtype == torch.float32
    cfg = dm.data_config
    pixels = x * torch.tensor(cfg.std).view(1, 3, 1, 1) + torch.tensor(cfg.mean).view(1, 3, 1, 1)
    assert torch.allclose(pixels[:, 0], pixels[:, 1], atol=1e-5)  # grayscale repeated to three channels
    assert torch.allclose(pixels[:, 0], pixels[:, 2], atol=1e-5)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) <= 9
    gray = _dm(data_config=data_config_dict("scratch/mlp", "none", 16, 1))
    x = next(iter(gray.val_dataloader())).inputs
    assert x.shape == (32, 1, 16, 16)
    assert dm.class_names == [str(d) for d in range(10)] and dm.num_classes == 10


def test_passes_without_gradient_take_their_own_batch_size() -> None:
    config = data_config_dict("scratch/mlp", "none", 8, 1)
    dm = _dm(data_config=config, batch_size=16, eval_batch_size=100)
    assert next(iter(dm.train_dataloader())).size == 16
    for loader in (
        dm.val_dataloader(),
        dm.test_dataloader(),
        dm.predict_dataloader(),
        dm.loader("train", one_pass=True),
    ):
        assert next(iter(loader)).size == 100
    assert next(iter(_dm(data_config=config, batch_size=16).val_dataloader())).size == 16  # default: batch_size


def test_default_size_is_the_backbone_input_size() -> None:
    dm = _dm(data_config=data_config_dict("timm/test_resnet", "none"))
    x = dm.datasets["test"][0].image
    assert isinstance(x, torch.Tensor) and x.shape == (3, 160, 160)


def test_short_training_on_digits_beats_chance_by_far(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm = DigitsDataModule(num_workers=0, batch_size=64, data_config=data_config_dict("scratch/mlp", "none", 8, 1))
    model = FineTuneModule(backbone="scratch/mlp", weights="none", image_size=8, in_chans=1, num_classes=10)
    trainer = quiet_trainer(tmp_path, max_epochs=8)
    trainer.fit(model, datamodule=dm)
    result = trainer.test(model, datamodule=dm, verbose=False)[0]
    assert result["test/acc"] > 0.85, result  # chance is 0.10


def test_kfold_folds_partition_train_and_val_and_leave_test_alone() -> None:
    plain = _dm()
    pool = set(_indices(plain, "train")) | set(_indices(plain, "val"))
    everything: Counter[int] = Counter(
        [*plain.datasets["train"].dataset.targets, *plain.datasets["val"].dataset.targets]
    )
    vals = []
    for fold in range(3):
        dm = _dm(num_folds=3, fold=fold)
        train, val = set(_indices(dm, "train")), set(_indices(dm, "val"))
        assert not train & val and train | val == pool  # train + val pooled, nothing lost
        assert _indices(dm, "test") == _indices(plain, "test")  # the test split is untouched
        counts: Counter[int] = Counter(dm.datasets["val"].dataset.targets)  # type: ignore[attr-defined]
        assert all(abs(counts[c] - n / 3) <= 1 for c, n in everything.items())  # stratified: a third of each class
        vals.append(val)
    assert not vals[0] & vals[1] and not vals[1] & vals[2] and vals[0] | vals[1] | vals[2] == pool
    assert _indices(_dm(num_folds=3, fold=1), "val") == _indices(_dm(num_folds=3, fold=1), "val")  # seeded


def test_kfold_pools_a_dataset_own_val_split() -> None:

    a = TensorImages(torch.zeros(6, 1, 2, 2, dtype=torch.uint8), [0, 1] * 3)
    b = TensorImages(torch.ones(4, 1, 2, 2, dtype=torch.uint8), [0, 1] * 2)
    pool = Concat([a, b])
    assert len(pool) == 10 and int(pool[7][0].sum()) == 4 and pool[7][1] == 1
    train, val = kfold_split(pool, 2, 0, seed=0)
    assert len(train) == len(val) == 5 and sorted([*train.targets, *val.targets]) == sorted(pool.targets)
    with pytest.raises(ConfigError, match="num_folds 6"):
        kfold_split(pool, 6, 0, seed=0)  # five samples per class


def test_kfold_arguments_are_checked() -> None:

    with pytest.raises(ConfigError, match="num_folds >= 2"):
        DigitsDataModule(num_folds=3, fold=3)
