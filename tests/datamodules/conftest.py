"""Small files in the real formats, written on the fly: image folders, CIFAR pickles, MNIST IDX, HF datasets."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


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


@pytest.fixture
def faulty_folder(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """An image folder with planted faults. Returns the root and {file name: expected fate}."""
    root = tmp_path / "faulty"
    write_class_folders(root, {"cat": 6, "dog": 6})
    fates = {}
    (root / "cat" / "zero.jpg").write_bytes(b"")
    fates["zero.jpg"] = "bad"
    buf = io.BytesIO()
    photo(100, (64, 64)).save(buf, format="JPEG")
    (root / "cat" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    fates["truncated.jpg"] = "bad"
    (root / "dog" / "not_an_image.jpg").write_text("this is text, not a JPEG")
    fates["not_an_image.jpg"] = "bad"
    photo(101, mode="CMYK").save(root / "dog" / "cmyk.jpg", format="JPEG")
    fates["cmyk.jpg"] = "good"
    photo(102, mode="RGBA").save(root / "dog" / "rgba_png_named.jpg", format="PNG")
    fates["rgba_png_named.jpg"] = "good"
    photo(103, mode="L").save(root / "cat" / "gray.png")
    fates["gray.png"] = "good"
    Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)).save(root / "cat" / "sixteen_bit.png")
    fates["sixteen_bit.png"] = "good"
    photo(104).convert("P").save(root / "dog" / "palette.png")
    fates["palette.png"] = "good"
    (root / "cat" / "Thumbs.db").write_bytes(b"\x00" * 64)
    (root / "dog" / ".DS_Store").write_bytes(b"\x00" * 64)
    (root / "cat" / ".ipynb_checkpoints").mkdir()
    photo(105).save(root / "cat" / ".ipynb_checkpoints" / "img_0-checkpoint.jpg")
    return root, fates


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
