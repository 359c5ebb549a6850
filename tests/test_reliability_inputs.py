"""Reliability of inputs: a few hundred images with planted bad files, and config mistakes that get one line.

docs/reliability.md.
"""

from __future__ import annotations

import csv
import io
import struct
import zlib
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
from PIL import Image

from datamodules.datasets import LabeledDataset, Subset
from datamodules.images import BadSample
from lightning_modules.cli.main import cli_main
from tests.helpers.data import photo

TINY = ["--model.backbone=timm/test_resnet", "--model.weights=none", "--model.image_size=32"]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
PER_CLASS = 120


def huge_png_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims `width` x `height` pixels: past PIL's decompression-bomb limit, 57 bytes long."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def write_dirty_folder(root: Path) -> tuple[set[str], dict[str, str]]:
    """`PER_CLASS` small images per class plus planted files. Returns the decodable names and, for each
    undecodable name, a word its reason must contain."""
    good: set[str] = set()
    bad: dict[str, str] = {}
    for c, cls in enumerate(("cat", "dog")):
        folder = root / cls
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            side = 16 + (i % 17)
            photo(1000 * c + i, (side, side)).save(folder / f"{cls}_{i}.jpg", quality=70)
            good.add(f"{cls}_{i}.jpg")
        photo(c, mode="CMYK").save(folder / f"{cls}_cmyk.jpg", format="JPEG")
        photo(c, mode="RGBA").save(folder / f"{cls}_rgba_png_named.jpg", format="PNG")
        photo(c, mode="L").save(folder / f"{cls}_gray.png")
        Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)).save(folder / f"{cls}_16bit.png")
        good |= {f"{cls}_cmyk.jpg", f"{cls}_rgba_png_named.jpg", f"{cls}_gray.png", f"{cls}_16bit.png"}
        (folder / f"{cls}_zero.jpg").write_bytes(b"")
        buf = io.BytesIO()
        photo(c + 7, (64, 64)).save(buf, format="JPEG")
        (folder / f"{cls}_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        (folder / f"{cls}_text.jpg").write_text("not a JPEG")
        (folder / f"{cls}_oversized.png").write_bytes(huge_png_header())
        bad |= {
            f"{cls}_zero.jpg": "empty file",
            f"{cls}_truncated.jpg": "truncated",
            f"{cls}_text.jpg": "not an image",
            f"{cls}_oversized.png": "decompression-bomb",
        }
        (folder / "Thumbs.db").write_bytes(b"\x00" * 64)
        (folder / ".ipynb_checkpoints").mkdir()
        photo(99).save(folder / ".ipynb_checkpoints" / f"{cls}_0-checkpoint.jpg")
    (root / ".hidden_class").mkdir()
    photo(98).save(root / ".hidden_class" / "x.jpg")
    return good, bad


def _path(dataset: Any, index: int) -> str:
    while isinstance(dataset, Subset):
        dataset, index = dataset.dataset, dataset.indices[index]
    return str(dataset.paths[index])


class Recording(LabeledDataset):
    """Records, per epoch, the file of every image the loader actually delivered."""

    def __init__(self, inner: LabeledDataset, seen: dict[int, list[str]], epoch: list[int]) -> None:
        self.inner, self.seen, self.epoch = inner, seen, epoch
        self.targets = inner.targets

    def __getitem__(self, index: int) -> Any:
        image, label = self.inner[index]
        if not isinstance(image, BadSample):
            self.seen.setdefault(self.epoch[0], []).append(Path(_path(self.inner, index)).name)
        return image, label


class RecordEpochs(pl.Callback):
    """Wraps the train and val datasets in `Recording` once the DataModule is set up."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[int, list[str]]] = {"train": {}, "val": {}}
        self.epoch = [0]
        self.expected: dict[str, set[str]] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        datasets = trainer.datamodule.datasets  # type: ignore[attr-defined]
        for split in ("train", "val"):
            inner = datasets[split].dataset
            if isinstance(inner, Recording):  # set up again for `test`
                continue
            self.expected[split] = {Path(_path(inner, i)).name for i in range(len(inner))}
            datasets[split].dataset = Recording(inner, self.seen[split], self.epoch)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch[0] = trainer.current_epoch

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch[0] = -1  # reads after the last epoch (the dashboard's misclassified val images) are no epoch's


@pytest.mark.slow
def test_dirty_folder_of_hundreds_of_images_every_epoch_sees_each_decodable_image_once(in_tmp: Path) -> None:
    good, bad = write_dirty_folder(in_tmp / "dirty")
    data = [
        "--data=datamodules.ImageFolderDataModule",
        f"--data.init_args.root={in_tmp / 'dirty'}",
        "--data.init_args.batch_size=32",
        "--data.init_args.num_workers=0",
        "--data.init_args.augment=basic",
    ]
    images_every_epoch = "--feature_cache.store=off"  # the quickstart's frozen epochs would read cached features
    args = [
        "--config",
        "experiments/quickstart.yaml",
        *TINY,
        *QUIET,
        *data,
        "--trainer.max_epochs=2",
        images_every_epoch,
    ]
    run = cli_main([*args, "--trainer.num_sanity_val_steps=0"], run=False)
    recorder = RecordEpochs()
    run.trainer.callbacks.append(recorder)  # type: ignore[attr-defined]
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert run.trainer.state.finished and run.trainer.current_epoch == 2
    for split in ("train", "val"):
        decodable = recorder.expected[split] & good
        assert len(decodable) >= 20
        for epoch in (0, 1):
            seen = recorder.seen[split][epoch]
            assert sorted(seen) == sorted(decodable), (split, epoch)  # each decodable image exactly once
    assert recorder.seen["train"][0] != recorder.seen["train"][1]  # reshuffled, not replayed
    run.trainer.test(run.model, datamodule=run.datamodule, verbose=False)  # reads the test split too
    with (Path(str(run.trainer.log_dir)) / "bad_images.csv").open(newline="") as f:
        rows = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(f)}
    assert set(rows) == set(bad)  # every undecodable file, nothing else (no Thumbs.db, no hidden folders)
    for name, word in bad.items():
        assert word in rows[name], (name, rows[name])
