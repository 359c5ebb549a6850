"""The feature cache: frozen epochs train on cached features, the switch to images at the first unfreeze, equal
results to the uncached path, hits on disk and invalidation on each key."""

from __future__ import annotations

import io
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from datamodules import DigitsDataModule, ImageFolderDataModule
from datamodules.common import ConfigError
from lightning_modules.backbones.backbone import data_config_dict
from lightning_modules.finetuning.strategies import Freeze, FreezeUnfreeze
from lightning_modules.module import FineTuneModule
from lightning_modules.speed.feature_cache import FeatureCache, cache_key
from tests.helpers.data import photo, tiny_loader, write_class_folders
from tests.helpers.models import quiet_trainer

BACKBONE = "timm/test_resnet"


class InputSpy(pl.Callback):
    """Per epoch and stage: the input ranks the model saw (2: features, 4: images), the samples, backbone calls."""

    def __init__(self) -> None:
        self.ranks: dict[tuple[int, str], set[int]] = defaultdict(set)
        self.samples: dict[tuple[int, str], int] = defaultdict(int)
        self.backbone_calls: dict[int, int] = defaultdict(int)
        self.in_batch = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        def count(*_: Any) -> None:
            self.backbone_calls[trainer.current_epoch] += self.in_batch

        pl_module.backbone.register_forward_hook(count)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        assert batch.features == (batch.inputs.dim() == 2)  # features are declared, not guessed from the shape
        self.ranks[(trainer.current_epoch, "train")].add(batch.inputs.dim())
        self.samples[(trainer.current_epoch, "train")] += batch.size
        self.in_batch = True

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, *args: Any) -> None:
        if not trainer.sanity_checking:
            assert batch.features == (batch.inputs.dim() == 2)
            self.ranks[(trainer.current_epoch, "val")].add(batch.inputs.dim())
            self.samples[(trainer.current_epoch, "val")] += batch.size
        self.in_batch = True

    def on_train_batch_end(self, *args: Any) -> None:
        self.in_batch = False

    def on_validation_batch_end(self, *args: Any) -> None:
        self.in_batch = False


def _data(augment: str = "none", **kw: Any) -> DigitsDataModule:
    config = data_config_dict(BACKBONE, "none", 32)
    return DigitsDataModule(batch_size=64, num_workers=0, augment=augment, data_config=config, **kw)


def _fit(
    strategy: pl.Callback,
    epochs: int,
    cache: FeatureCache | None,
    data: Any = None,
    classes: int | None = None,
    **kw: Any,
) -> Any:
    pl.seed_everything(0)
    model = FineTuneModule(backbone=BACKBONE, weights="none", image_size=32, num_classes=classes)  # None: the data's
    spy = InputSpy()
    callbacks = [strategy, spy] + ([cache] if cache else [])
    trainer = quiet_trainer(Path("."), max_epochs=epochs, limit_train_batches=6, callbacks=callbacks, **kw)
    trainer.fit(model, datamodule=data or _data())
    return model, spy, trainer


class CountedLoaders(DigitsDataModule):
    """Digits whose train and val loaders count how often the trainer asks for one."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.built: dict[str, int] = defaultdict(int)

    def train_dataloader(self) -> Any:
        self.built["train"] += 1
        return super().train_dataloader()

    def val_dataloader(self) -> Any:
        self.built["val"] += 1
        return super().val_dataloader()


def test_frozen_epochs_use_features_and_the_unfreeze_switches_to_images(tmp_path: Path) -> None:
    cache = FeatureCache()
    data = CountedLoaders(
        batch_size=64, num_workers=0, augment="none", data_config=data_config_dict(BACKBONE, "none", 32)
    )
    model, spy, trainer = _fit(FreezeUnfreeze(unfreeze_at_epoch=2, stages=1), 3, cache, data=data)
    assert sorted(cache.computed) == ["train", "val"]  # val first: the sanity check asks for it
    for epoch in (0, 1):
        assert spy.ranks[(epoch, "train")] == {2} and spy.ranks[(epoch, "val")] == {2}
        assert spy.backbone_calls[epoch] == 0
    assert spy.ranks[(2, "train")] == {4} and spy.ranks[(2, "val")] == {4}
    assert spy.backbone_calls[2] > 0
    # the same two loaders served features, then images: none rebuilt, no trainer setting switched
    assert data.built == {"train": 1, "val": 1}
    assert trainer.reload_dataloaders_every_n_epochs == 0
    trainer.validate(model, datamodule=data, verbose=False)
    assert spy.ranks[(3, "val")] == {4}  # outside the fit, images


def _assert_cached_path(spy: InputSpy, epochs: tuple[int, ...]) -> None:
    """In these epochs the model saw features only, and the backbone never ran inside a train or val batch."""
    for epoch in epochs:
        assert spy.ranks[(epoch, "train")] == {2} and spy.ranks[(epoch, "val")] == {2}, epoch
        assert spy.backbone_calls[epoch] == 0, epoch


def test_cached_run_equals_uncached_run() -> None:
    torch.set_num_threads(2)  # as measured below (with one thread the two runs differ in the last bits; restored after)
    cache = FeatureCache()
    cached, cached_spy, _ = _fit(FreezeUnfreeze(unfreeze_at_epoch=2, stages=1), 3, cache)
    plain, spy, _ = _fit(FreezeUnfreeze(unfreeze_at_epoch=2, stages=1), 3, None)
    assert sorted(cache.computed) == ["train", "val"]
    _assert_cached_path(cached_spy, (0, 1))  # the cached run really trained on features ...
    assert spy.ranks[(0, "train")] == {4} and spy.backbone_calls[0] > 0  # ... and the reference on images
    assert cached_spy.samples == spy.samples
    # Tolerance zero: the cached features are the eval-mode backbone's output for the same images, so the head
    # sees the same numbers in the same order (measured: every tensor bit for bit equal on this 2-core CPU, with
    # and without deterministic algorithms).
    for (name, a), b in zip(cached.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_the_cache_leaves_out_unreadable_files_as_the_image_path_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's path: an image folder with files that cannot be read, features cached in the frozen phase."""
    root = tmp_path / "imgs"
    seed = write_class_folders(root / "train", {"cat": 10, "dog": 9})  # 20 files, 19 readable: no batch of 1
    write_class_folders(root / "val", {"cat": 4, "dog": 4}, start=write_class_folders(root / "test", {"cat": 2}, seed))
    buffer = io.BytesIO()
    photo(100, (64, 64)).save(buffer, format="JPEG")
    cut = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    bad = {  # two that the listing's header check rejects, two that pass it and fail to decode in a batch
        root / "train" / "cat" / "empty.jpg": b"",
        root / "train" / "dog" / "text.jpg": b"not a JPEG",
        root / "train" / "cat" / "cut.jpg": cut,
        root / "val" / "dog" / "cut.jpg": cut,
    }
    for path, content in bad.items():
        path.write_bytes(content)

    def data() -> ImageFolderDataModule:
        config = data_config_dict(BACKBONE, "none", 32)
        return ImageFolderDataModule(root=str(root), batch_size=8, num_workers=0, augment="none", data_config=config)

    monkeypatch.chdir(tmp_path)  # bad_images.csv is written in the working directory (no logger)
    cache = FeatureCache()
    _, cached_spy, cached = _fit(Freeze(), 2, cache, data=data())
    _, spy, plain = _fit(Freeze(), 2, None, data=data())
    assert sorted(cache.computed) == ["train", "val"]
    _assert_cached_path(cached_spy, (0, 1))
    assert spy.ranks[(0, "train")] == {4}
    # each readable image once per epoch, in its split; the unreadable ones left out, never replaced
    assert cached_spy.samples == spy.samples
    assert [cached_spy.samples[(epoch, split)] for epoch in (0, 1) for split in ("train", "val")] == [19, 8, 19, 8]
    for trainer in (cached, plain):
        assert {Path(path) for _, path, _ in trainer.datamodule.skipped} == set(bad)


def test_random_augmentation_caches_val_only_unless_forced(caplog: pytest.LogCaptureFixture) -> None:
    cache = FeatureCache()
    _, spy, _ = _fit(Freeze(), 1, cache, data=_data(augment="affine"))
    assert "feature cache: train features not cached, augmentation 'affine' is random" in caplog.text
    assert cache.computed == ["val"] and spy.ranks[(0, "train")] == {4} and spy.ranks[(0, "val")] == {2}
    forced = FeatureCache(force=True)
    _, spy, _ = _fit(Freeze(), 1, forced, data=_data(augment="affine"))
    assert "the frozen phase trains on un-augmented images" in caplog.text
    assert sorted(forced.computed) == ["train", "val"] and spy.ranks[(0, "train")] == {2}


def test_no_strategy_or_unfrozen_start_means_no_cache() -> None:
    cache = FeatureCache()
    _, spy, _ = _fit(FreezeUnfreeze(unfreeze_at_epoch=0), 1, cache)
    assert cache.computed == [] and spy.ranks[(0, "train")] == {4}


def test_disk_cache_is_reused_by_the_next_run(tmp_path: Path) -> None:
    first = FeatureCache(store="disk", cache_dir=str(tmp_path))
    _fit(Freeze(), 1, first)
    assert sorted(first.computed) == ["train", "val"] and len(list(tmp_path.glob("*.pt"))) == 2
    again = FeatureCache(store="disk", cache_dir=str(tmp_path))
    _, spy, _ = _fit(Freeze(), 2, again)
    assert again.computed == [] and sorted(again.loaded) == ["train", "val"]
    assert spy.ranks[(1, "train")] == {2} and spy.backbone_calls[0] == spy.backbone_calls[1] == 0


def test_resume_after_the_frozen_phase_reads_images(tmp_path: Path) -> None:
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="last")
    pl.seed_everything(0)
    model = FineTuneModule(backbone=BACKBONE, weights="none", image_size=32, num_classes=10)
    trainer = quiet_trainer(
        tmp_path,
        max_epochs=1,
        limit_train_batches=2,
        enable_checkpointing=True,
        callbacks=[FreezeUnfreeze(unfreeze_at_epoch=1), FeatureCache(), checkpoint],
    )
    trainer.fit(model, datamodule=_data())
    cache, spy = FeatureCache(), InputSpy()
    resumed = quiet_trainer(
        tmp_path, max_epochs=2, limit_train_batches=2, callbacks=[FreezeUnfreeze(unfreeze_at_epoch=1), cache, spy]
    )
    resumed.fit(model, datamodule=_data(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert cache.computed == [] and spy.ranks[(1, "train")] == {4}


def test_data_that_cannot_serve_features_is_a_loud_error() -> None:
    class Plain(pl.LightningDataModule):
        def train_dataloader(self) -> Any:
            return tiny_loader()

    with pytest.raises(ConfigError, match=r"feature_cache needs an ImageClassificationDataModule \(got Plain\); set"):
        _fit(Freeze(), 1, FeatureCache(), data=Plain(), classes=10)
    _, spy, _ = _fit(Freeze(), 1, FeatureCache(store="off"), data=Plain(), classes=10, limit_val_batches=0)
    assert spy.ranks[(0, "train")] == {4}


def _key(model: FineTuneModule, data: Any, split: str = "val") -> str | None:
    data.setup("fit")
    return cache_key(model.backbone, data.datasets[split], split)


def test_cache_key_changes_with_each_input(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FineTuneModule(backbone=BACKBONE, weights="none", image_size=32, num_classes=10)
    base = _key(model, _data())
    assert base is not None and base == _key(model, _data())  # stable
    assert _key(model, _data(), "train") != base  # split
    assert _key(model, _data(split_seed=7)) != base  # data: other samples
    config = data_config_dict(BACKBONE, "none", 40)
    assert _key(model, DigitsDataModule(num_workers=0, augment="none", data_config=config)) != base  # preprocessing
    with torch.no_grad():
        next(model.backbone.parameters()).add_(1e-3)
    assert _key(model, _data()) != base  # weights
    other = FineTuneModule(backbone="timm/test_efficientnet", weights="none", image_size=32, num_classes=10)
    assert _key(other, _data()) != base  # backbone


def test_cache_key_changes_when_an_image_file_changes(tmp_path: Path) -> None:
    write_class_folders(tmp_path, {"cat": 6, "dog": 6})
    torch.manual_seed(0)
    model = FineTuneModule(backbone=BACKBONE, weights="none", image_size=32, num_classes=2)

    def key() -> str | None:
        config = data_config_dict(BACKBONE, "none", 32)
        return _key(model, ImageFolderDataModule(root=str(tmp_path), num_workers=0, data_config=config), "train")

    before = key()
    assert before is not None and key() == before
    victim = next(tmp_path.rglob("*.jpg"))
    os.utime(victim, ns=(0, 0))
    assert key() != before


@pytest.mark.parametrize("bar", [True, False])
def test_the_feature_pass_shows_its_progress_unless_the_progress_bar_is_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bar: bool
) -> None:
    root = tmp_path / "imgs"
    seed = write_class_folders(root / "train", {"cat": 6, "dog": 6})
    write_class_folders(root / "test", {"cat": 2}, start=write_class_folders(root / "val", {"cat": 3, "dog": 3}, seed))
    config = data_config_dict(BACKBONE, "none", 32)
    data = ImageFolderDataModule(root=str(root), batch_size=4, num_workers=0, augment="none", data_config=config)
    capsys.readouterr()
    _fit(Freeze(), 1, FeatureCache(), data=data, enable_progress_bar=bar)
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    features = [line for line in lines if " features: " in line]
    if bar:  # the closing line of each pass: the images done of all, and the rate
        assert any(
            line.startswith("train features: 100%") and "12/12 [" in line and "image/s]" in line for line in lines
        )
        assert any(line.startswith("val features: 100%") and "6/6 [" in line for line in lines), features
    else:
        assert features == []
