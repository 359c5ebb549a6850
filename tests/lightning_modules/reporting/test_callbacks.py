"""The best checkpoint: ties on val/acc go to the lower val/loss, and the rule survives a resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.reporting.callbacks import BestCheckpoint
from tests.helpers.models import quiet_trainer


class Scripted(pl.LightningModule):
    """Logs a given val/acc and val/loss at each epoch (nothing else matters to the checkpoint's choice)."""

    def __init__(self, accs: list[float], losses: list[float]) -> None:
        super().__init__()
        self.accs, self.losses = accs, losses
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).sum()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        epoch = self.current_epoch
        self.log("val/acc", self.accs[epoch])
        self.log("val/loss", self.losses[epoch])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(2, 1)), batch_size=2)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.zeros(2, 1)), batch_size=2)


def best_epoch(tmp: Path, callback: ModelCheckpoint, accs: list[float], losses: list[float], **fit: Any) -> int:
    trainer = quiet_trainer(tmp, max_epochs=len(accs), callbacks=[callback], enable_checkpointing=True)
    trainer.fit(Scripted(accs, losses), **fit)
    return int(torch.load(callback.best_model_path, weights_only=True)["epoch"])


def checkpoint(tmp: Path, cls: type[ModelCheckpoint] = BestCheckpoint) -> Any:
    return cls(dirpath=tmp / "ckpt", monitor="val/acc", mode="max", filename="best-{epoch}", save_top_k=1)


@pytest.mark.parametrize(
    ("accs", "losses", "expected"),
    [
        ([0.5, 0.8, 0.8, 0.8, 0.7], [1.0, 0.6, 0.4, 0.5, 0.3], 2),  # a tie with a lower loss replaces the kept one
        ([0.8, 0.8, 0.8], [0.4, 0.5, 0.4], 0),  # an equal or higher loss does not
        ([0.8, 0.9, 0.9], [0.4, 0.9, 0.8], 2),  # accuracy first: a higher accuracy wins whatever its loss
    ],
)
def test_best_checkpoint_breaks_accuracy_ties_by_the_lower_val_loss(
    tmp_path: Path, accs: list[float], losses: list[float], expected: int
) -> None:
    assert best_epoch(tmp_path, checkpoint(tmp_path), accs, losses) == expected


def test_lightning_alone_keeps_the_first_of_equal_accuracies(tmp_path: Path) -> None:
    """What the tie rule changes: Lightning's ModelCheckpoint keeps epoch 1 of these."""
    accs, losses = [0.5, 0.8, 0.8, 0.8, 0.7], [1.0, 0.6, 0.4, 0.5, 0.3]
    assert best_epoch(tmp_path, checkpoint(tmp_path, ModelCheckpoint), accs, losses) == 1


def test_the_tie_rule_survives_a_resume(tmp_path: Path) -> None:
    accs, losses = [0.8, 0.8, 0.8, 0.8], [0.5, 0.4, 0.45, 0.42]
    last = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last", save_top_k=1)
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[checkpoint(tmp_path), last], enable_checkpointing=True)
    trainer.fit(Scripted(accs, losses))
    resumed = checkpoint(tmp_path)
    epoch = best_epoch(tmp_path, resumed, accs, losses, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert epoch == 1  # epochs 2 and 3 tie on accuracy with higher losses than epoch 1's 0.4 (restored)
    assert resumed.tie_scores == {resumed.best_model_path: pytest.approx(0.4)}
