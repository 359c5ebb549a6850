"""finetune-lab's data: one base DataModule, a thin subclass per dataset, and transforms."""

from datamodules.base import ImageClassificationDataModule
from datamodules.digits import DigitsDataModule

__all__ = ["DigitsDataModule", "ImageClassificationDataModule"]
