"""Tiny data in the real formats, made on the fly: photos, class folders, CIFAR-10 pickles, MNIST IDX, EXIF, a
loader of `Batch`es."""

from __future__ import annotations

import gzip
import pickle
import struct
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from datamodules.batches import Transformed, collate
from datamodules.datasets import TensorImages


def photo(seed: int, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> Image.Image:
    """A small random image; the seed makes each file distinct."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "CMYK": 4}[mode]
    arr = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode=mode)


def write_class_folders(root: Path, classes: dict[str, int], start: int = 0, ext: str = ".jpg") -> int:
    """`root/<class>/img_N.jpg`, `count` images per class; returns the next seed."""
    seed = start
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            photo(seed).save(root / name / f"img_{seed}{ext}")
            seed += 1
    return seed


def write_cifar(root: Path, per_batch: int = 20) -> Path:
    """`root/cifar-10-batches-py` with 2 train batches and a test batch in CIFAR-10's python pickle format."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("data_batch_1", "data_batch_2", "test_batch"):
        batch = {
            "batch_label": name,
            "labels": [i % 10 for i in range(per_batch)],
            "data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
            "filenames": [f"{name}_{i}.png" for i in range(per_batch)],
        }
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f)
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile"], "num_vis": 3072}, f)
    return folder


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    """An unsigned-byte IDX file (MNIST's format), optionally gzipped."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def write_mnist(root: Path, gz: bool, n_train: int = 50, n_test: int = 20) -> Path:
    """The four MNIST IDX files in torchvision's `MNIST/raw` layout."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, gz)
    return raw


def image_exif(orientation: int) -> Image.Exif:
    """EXIF data with only an orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def tiny_loader(n: int = 16) -> DataLoader:
    """`Batch`es of random 32 px images in three classes, as the package's loaders make them."""
    g = torch.Generator().manual_seed(0)
    images = TensorImages(torch.rand(n, 3, 32, 32, generator=g), [i % 3 for i in range(n)])
    return DataLoader(Transformed(images, nn.Identity()), batch_size=8, collate_fn=partial(collate, split="train"))
