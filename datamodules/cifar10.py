"""CIFAR-10 from its python pickles (`cifar-10-batches-py`), downloaded by torchvision when missing."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.base import ImageClassificationDataModule, LabeledDataset, TensorImages
from lightning_modules.errors import ConfigError

FOLDER = "cifar-10-batches-py"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def read_cifar_batches(files: list[Path]) -> TensorImages:
    """Images (N, 3, 32, 32) uint8 and labels from CIFAR-10 python pickle batches."""
    images, labels = [], []
    for f in files:
        with f.open("rb") as fh:
            batch = pickle.load(fh, encoding="latin1")
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels += list(batch["labels"])
    return TensorImages(torch.from_numpy(np.concatenate(images)), labels)


class CIFAR10DataModule(ImageClassificationDataModule):
    """CIFAR-10: 50,000 train and 10,000 test images of 32 pixels in ten classes; val carved from train.

    32-pixel images are resized to the backbone's input size (its pretrained preprocessing); to train at
    another size, set `model.image_size` (32 keeps them native, e.g. for `scratch/simple_cnn`).

    Args:
        root: folder holding (or receiving) `cifar-10-batches-py`.
        download: let torchvision download the archive when the batches are missing.
    """

    def __init__(self, root: str = "data", download: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        self.download = download

    @property
    def class_names(self) -> list[str]:
        """The ten CIFAR-10 classes in label order."""
        return list(CLASSES)

    def prepare_data(self) -> None:
        """Download once (rank 0) when the batches are missing and downloading is allowed."""
        if not (self.root / FOLDER).is_dir() and self.download:
            import torchvision

            try:
                torchvision.datasets.CIFAR10(str(self.root), train=True, download=True)
            except Exception as err:  # offline: build_splits says how to get the files
                print(f"CIFAR-10 download failed: {err}")

    def build_splits(self) -> dict[str, LabeledDataset]:
        """train from data_batch_1..5, test from test_batch."""
        folder = self.root / FOLDER
        train_files = sorted(folder.glob("data_batch_*"))
        test_file = folder / "test_batch"
        if not train_files or not test_file.is_file():
            raise ConfigError(
                f"CIFAR-10 not found at {folder.resolve()} (needs data_batch_1..5 and test_batch). Download "
                f"cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract it into "
                f"{self.root.resolve()}, or set data.init_args.root to where it is."
            )
        return {"train": read_cifar_batches(train_files), "test": read_cifar_batches([test_file])}
