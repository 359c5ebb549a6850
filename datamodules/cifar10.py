"""CIFAR-10 from its python pickles (`cifar-10-batches-py`), downloaded by torchvision when missing."""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from typing_extensions import override

try:  # numpy 2
    from numpy._core import multiarray as np_multiarray
    from numpy._core import numeric as np_numeric
except ImportError:  # numpy 1
    from numpy.core import multiarray as np_multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as np_numeric  # type: ignore[no-redef]

from datamodules.base import ImageClassificationDataModule
from datamodules.common import ConfigError
from datamodules.datasets import LabeledDataset, TensorImages

FOLDER = "cifar-10-batches-py"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# What a CIFAR-10 python batch needs to unpickle: numpy arrays (as written by numpy 1 or 2) and bytes. Nothing else is
# ever looked up, so a crafted file cannot name a function to run.
NUMPY_ARRAY_PARTS = {
    ("numpy.core.multiarray", "_reconstruct"): np_multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): np_multiarray._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): getattr(np_numeric, "_frombuffer"),  # noqa: B009 (private: untyped)
    ("numpy._core.numeric", "_frombuffer"): getattr(np_numeric, "_frombuffer"),  # noqa: B009
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # how Python 3 writes bytes at pickle protocol 2
}


class ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, bytes, numbers and numpy arrays; refuses every other global."""

    @override
    def find_class(self, module: str, name: str) -> Any:
        """Only the numpy array constructors of `NUMPY_ARRAY_PARTS`."""
        if (module, name) in NUMPY_ARRAY_PARTS:
            return NUMPY_ARRAY_PARTS[module, name]
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR-10 batch never holds")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    """Images (N, 3, 32, 32) uint8 and labels of one CIFAR-10 python batch, or a ConfigError naming the file."""
    how = "re-extract cifar-10-python.tar.gz there, or set data.init_args.root to an intact copy"
    try:
        with path.open("rb") as f:
            batch = ArraysOnlyUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as err:
        raise ConfigError(f"CIFAR-10 batch {path} refused or unreadable ({err}); {how}") from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as err:
        raise ConfigError(f"CIFAR-10 batch {path} is truncated or damaged ({type(err).__name__}); {how}") from None
    data = batch.get("data") if isinstance(batch, dict) else None
    labels = batch.get("labels") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ConfigError(f"CIFAR-10 batch {path} has no 'data' array of N x 3072 bytes; {how}")
    if not isinstance(labels, list) or len(labels) != len(data) or not all(v in range(10) for v in labels):
        raise ConfigError(f"CIFAR-10 batch {path} has no 'labels' list of {len(data)} classes 0-9; {how}")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar_batches(files: list[Path]) -> TensorImages:
    """Images (N, 3, 32, 32) uint8 and labels from CIFAR-10 python pickle batches."""
    parts = [read_cifar_batch(f) for f in files]
    images = np.concatenate([images for images, _ in parts])
    return TensorImages(torch.from_numpy(images), [label for _, labels in parts for label in labels])


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

    @override
    @property
    def class_names(self) -> list[str]:
        """The ten CIFAR-10 classes in label order."""
        return list(CLASSES)

    @override
    def prepare_data(self) -> None:
        """Download once (rank 0) when the batches are missing and downloading is allowed."""
        if not (self.root / FOLDER).is_dir() and self.download:
            import torchvision

            try:
                torchvision.datasets.CIFAR10(str(self.root), train=True, download=True)
            except Exception as err:  # offline: build_splits says how to get the files
                print(f"CIFAR-10 download failed: {err}")

    @override
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
