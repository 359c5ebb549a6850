"""Regularisation switches: mixup and cutmix (targets, loss, train metrics), stochastic depth reaching timm,
test-time augmentation (the mean of the views' probabilities), weight averaging (the averaged weights are the best
checkpoint's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EMAWeightAveraging
from timm.layers import DropPath

from datamodules.batches import Batch
from datamodules.common import ConfigError
from lightning_modules.backbones.backbone import build_backbone
from lightning_modules.finetuning.batch_augment import BatchMixer, tta_views
from lightning_modules.module import FineTuneModule
from lightning_modules.reporting.callbacks import BestCheckpoint
from tests.helpers.data import tiny_loader
from tests.helpers.models import quiet_trainer, tiny_model


def known_batch() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(4)])  # image i is all i
    return images, torch.tensor([0, 1, 2, 1])


def test_mixup_mixes_each_image_with_its_neighbour_and_the_targets_alike() -> None:
    images, labels = known_batch()
    mixed, soft = BatchMixer(3, mixup=1.0)(images, labels, seed=7)
    # image 0 is lam * image 0 + (1 - lam) * image 3 (torchvision rolls the batch by one)
    lam = 1 - float(mixed[0, 0, 0, 0]) / 3.0
    assert 0 < lam < 1
    rolled = images.roll(1, 0)
    assert torch.allclose(mixed, lam * images + (1 - lam) * rolled, atol=1e-6)
    onehot = F.one_hot(labels, 3).float()
    assert torch.allclose(soft, lam * onehot + (1 - lam) * onehot.roll(1, 0), atol=1e-6)
    again, _ = BatchMixer(3, mixup=1.0)(images, labels, seed=7)
    other, _ = BatchMixer(3, mixup=1.0)(images, labels, seed=8)
    assert torch.equal(again, mixed) and not torch.equal(other, mixed)  # the seed alone decides


def test_cutmix_pastes_a_box_and_weights_the_targets_by_its_area() -> None:
    images, labels = known_batch()
    mixed, soft = BatchMixer(3, cutmix=1.0)(images, labels, seed=3)
    pasted = mixed != images  # the box: pixels of image i that come from image i - 1
    area = pasted[0, 0].float().mean()
    assert 0 < float(area) < 1 and torch.equal(pasted[0], pasted[1])  # one box for the batch
    assert torch.equal(mixed[pasted], images.roll(1, 0)[pasted])
    onehot = F.one_hot(labels, 3).float()
    assert torch.allclose(soft, (1 - area) * onehot + area * onehot.roll(1, 0), atol=1e-6)


def test_training_loss_reads_the_soft_targets_and_metrics_their_larger_class() -> None:
    torch.manual_seed(0)
    model = FineTuneModule(backbone="timm/test_resnet", weights="none", image_size=32, num_classes=3, mixup=0.4)
    batch: Batch = next(iter(tiny_loader()))
    model.train()
    mixed, soft = model.mixer(batch.inputs, batch.targets, seed=11)
    step = model._shared_step(batch, "train", mix_seed=11)
    assert step is not None
    loss, logits = step
    assert torch.allclose(logits, model(mixed), atol=1e-6)
    assert torch.allclose(loss, F.cross_entropy(logits, soft), atol=1e-6)
    acc = model.metrics["train_metrics"]["acc"]  # type: ignore[index]
    expected = (logits.argmax(1) == soft.argmax(1)).float().mean()
    assert torch.allclose(acc.compute(), expected)
    # without a seed (validation), nothing is mixed
    model.metrics["val_metrics"].reset()  # type: ignore[union-attr,operator]
    val = model._shared_step(batch._replace(split="val"), "val")
    assert val is not None and torch.allclose(val[1], model(batch.inputs), atol=1e-6)


def test_mixing_never_touches_cached_features() -> None:
    model = FineTuneModule(backbone="timm/test_resnet", weights="none", image_size=32, num_classes=3, cutmix=1.0)
    features = torch.rand(4, model.backbone.num_features)
    batch = Batch(features, torch.tensor([0, 1, 2, 0]), torch.arange(4), [], "train", features=True)
    step = model._shared_step(batch, "train", mix_seed=1)
    assert step is not None and torch.allclose(step[1], model.head(features))


@pytest.mark.parametrize(("key", "value"), [("mixup", -0.1), ("cutmix", -1.0), ("tta", "flips")])
def test_bad_regularisation_values_are_clear_errors(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"model.{key}"):
        FineTuneModule(backbone="timm/test_resnet", weights="none", image_size=32, num_classes=3, **{key: value})


def test_drop_path_rate_reaches_timm_and_only_timm() -> None:
    backbone = build_backbone("timm/test_efficientnet", "none", 32, drop_path_rate=0.2)
    rates = [m.drop_prob for m in backbone.modules() if isinstance(m, DropPath)]
    assert rates == sorted(rates) and 0.1 < max(rates) <= 0.2 and min(rates) < max(rates)  # timm: by depth
    plain = build_backbone("timm/test_efficientnet", "none", 32)
    assert not [m for m in plain.modules() if isinstance(m, DropPath) and m.drop_prob > 0]
    with pytest.raises(
        ConfigError,
        match=r"drop_path_rate 0.1: a rate in \[0, 1\), .* source that takes it \(timm\)",
    ):
        build_backbone("torchvision/resnet18", "none", 32, drop_path_rate=0.1)


@pytest.mark.parametrize("mode", ["flip", "flip_crops"])
def test_tta_probabilities_are_the_mean_of_the_views(mode: str) -> None:
    torch.manual_seed(0)
    model = FineTuneModule(backbone="timm/test_resnet", weights="none", image_size=32, num_classes=3, tta=mode)
    model.eval()
    batch: Batch = next(iter(tiny_loader()))
    with torch.no_grad():
        probs = model.predict_step(batch._replace(split="predict"), 0)
        plain, flipped = model(batch.inputs).softmax(1), model(batch.inputs.flip(-1)).softmax(1)
        views = tta_views(batch.inputs, mode)
        expected = torch.stack([model(v).softmax(1) for v in views]).mean(0)
    assert len(views) == (2 if mode == "flip" else 6)
    assert torch.allclose(probs, expected, atol=1e-6)
    if mode == "flip":
        assert torch.allclose(probs, (plain + flipped) / 2, atol=1e-6)
    assert not torch.allclose(probs, plain, atol=1e-4)  # the views do change the answer


class AveragedAtValidation(pl.Callback):
    """The weights each validation runs with (after EMAWeightAveraging swapped the average in)."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, dict[str, torch.Tensor]] = {}
        self.raw: dict[int, dict[str, torch.Tensor]] = {}

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.by_epoch[trainer.current_epoch] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.raw[trainer.current_epoch] = {k: v.clone() for k, v in pl_module.state_dict().items()}


@pytest.mark.slow
def test_weight_averaging_validates_checkpoints_and_tests_the_averaged_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tiny_model()
    best = BestCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc", mode="max", filename="best-{epoch}")
    seen = AveragedAtValidation()
    ema = EMAWeightAveraging(decay=0.5)
    trainer = quiet_trainer(tmp_path, max_epochs=3, callbacks=[ema, seen, best], enable_checkpointing=True)
    trainer.fit(model, tiny_loader(), tiny_loader())
    saved = torch.load(best.best_model_path, weights_only=True)
    epoch = saved["epoch"]
    head = "head.0.weight"
    assert torch.equal(saved["state_dict"][head], seen.by_epoch[epoch][head])  # what val/acc was measured on
    assert not torch.equal(saved["state_dict"][head], saved["current_model_state"][head])  # not the raw weights
    # after the fit the module holds the average: what `trainer.test` and an export read
    assert torch.equal(model.state_dict()[head], ema._average_model.module.state_dict()[head])  # type: ignore[union-attr]
    assert not torch.equal(model.state_dict()[head], seen.raw[2][head])
