"""finetune-lab's data: one base DataModule, a thin subclass per dataset, and transforms."""

from datamodules.base import ImageClassificationDataModule
from datamodules.cats_vs_dogs import CatsVsDogsDataModule
from datamodules.cifar10 import CIFAR10DataModule
from datamodules.digits import DigitsDataModule
from datamodules.folder import ImageFolderDataModule
from datamodules.hugging_face import HuggingFaceDataModule
from datamodules.mnist import MNISTDataModule
from datamodules.pet_expressions import PetExpressionsDataModule

__all__ = [
    "CIFAR10DataModule",
    "CatsVsDogsDataModule",
    "DigitsDataModule",
    "HuggingFaceDataModule",
    "ImageClassificationDataModule",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "PetExpressionsDataModule",
]
