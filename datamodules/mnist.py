"""MNIST from its raw IDX files (gzipped or not), downloaded by torchvision when missing."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from typing_extensions import override

from datamodules.base import ImageClassificationDataModule
from datamodules.common import ConfigError
from datamodules.datasets import LabeledDataset, TensorImages

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST format: magic, dimension sizes, big-endian data); `.gz` is read through gzip."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, OSError, zlib.error) as err:  # a cut download, or not gzip at all
        raise ConfigError(f"{path} cannot be read ({err}); download or copy it again") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ConfigError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ConfigError(f"{path} is truncated: header says {shape}, file holds {array.size} values")
    return array.reshape(shape)


class MNISTDataModule(ImageClassificationDataModule):
    """MNIST: 60,000 train and 10,000 test 28x28 digits; val is 20% of train (the exercise's 80/20 split).

    Grayscale becomes three channels for pretrained backbones and stays one channel for a model with
    `in_chans: 1` (the scratch models), following the backbone's data config.

    Args:
        root: folder with the IDX files, directly or in `MNIST/raw/` (torchvision's layout).
        download: let torchvision download them when missing.
    """

    def __init__(self, root: str = "data", download: bool = True, val_fraction: float = 0.2, **kwargs: Any) -> None:
        super().__init__(val_fraction=val_fraction, **kwargs)
        self.root = Path(root)
        self.download = download

    @override
    @property
    def class_names(self) -> list[str]:
        """The digits 0 to 9."""
        return [str(d) for d in range(10)]

    def _find(self, name: str) -> Path | None:
        for folder in (self.root / "MNIST" / "raw", self.root):
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
        return None

    @override
    def prepare_data(self) -> None:
        """Download once (rank 0) when files are missing and downloading is allowed."""
        if self._find(FILES["train"][0]) is None and self.download:
            import torchvision

            try:
                torchvision.datasets.MNIST(str(self.root), train=True, download=True)
            except Exception as err:  # offline: build_splits says how to get the files
                print(f"MNIST download failed: {err}")

    @override
    def build_splits(self) -> dict[str, LabeledDataset]:
        """train and test from their IDX image and label files."""
        splits: dict[str, LabeledDataset] = {}
        for split, (images_name, labels_name) in FILES.items():
            images, labels = self._find(images_name), self._find(labels_name)
            if images is None or labels is None:
                raise ConfigError(
                    f"MNIST file {images_name if images is None else labels_name}[.gz] not found in "
                    f"{(self.root / 'MNIST' / 'raw').resolve()} or {self.root.resolve()}. Copy the four IDX files "
                    f"(from http://yann.lecun.com/exdb/mnist/ or a machine with torchvision's MNIST) there."
                )
            pixels = torch.from_numpy(read_idx(images).copy()).unsqueeze(1)
            splits[split] = TensorImages(pixels, read_idx(labels).tolist())
        return splits
