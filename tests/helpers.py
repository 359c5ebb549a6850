"""Shared test helpers: paths and overrides, tiny data in the real formats, a quiet Trainer, a tiny finetuning setup,
and the callbacks that tests load into `ftlab` runs (through PYTHONPATH in subprocesses) to inject faults or check
state. Test modules import from here, never from another test module or a conftest."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import signal
import struct
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from datamodules.batches import Transformed, collate
from datamodules.datasets import TensorImages
from lightning_modules.module import FineTuneModule

REPO = Path(__file__).resolve().parents[1]

# Overrides that make any experiment tiny: fast_dev_run, no workers, no progress bar.
FAST = [
    "--trainer.fast_dev_run=true",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.init_args.num_workers=0",
]


def quiet_trainer(root: Path, **kwargs: Any) -> pl.Trainer:
    """A Trainer for tests: no logger, checkpoints, progress bar or summary unless asked for."""
    defaults: dict[str, Any] = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(root),
    }
    return pl.Trainer(**{**defaults, **kwargs})


def folder_args(root: Path, batch_size: int) -> list[str]:
    """The own-images recipe with a tiny stand-in backbone."""
    return [
        "--config",
        "experiments/data/image_folder.yaml",
        "--model.backbone=timm/test_resnet",
        "--model.weights=none",
        "--model.image_size=32",
        f"--data.init_args.root={root}",
        f"--data.init_args.batch_size={batch_size}",
        "--data.init_args.num_workers=0",
        "--trainer.enable_progress_bar=false",
    ]


# ------------------------------------------------------------------------------ tiny data in the real formats


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


# ------------------------------------------------------------------- a tiny finetuning setup, at the tensor level


def tiny_loader(n: int = 16) -> DataLoader:
    """`Batch`es of random 32 px images in three classes, as the package's loaders make them."""
    g = torch.Generator().manual_seed(0)
    images = TensorImages(torch.rand(n, 3, 32, 32, generator=g), [i % 3 for i in range(n)])
    return DataLoader(Transformed(images, nn.Identity()), batch_size=8, collate_fn=partial(collate, split="train"))


def tiny_model() -> FineTuneModule:
    """timm's test_resnet at 32 px with a three-class head, no pretrained weights."""
    return FineTuneModule(backbone="timm/test_resnet", weights="none", image_size=32, num_classes=3)


def bn_stats(model: FineTuneModule, stage: str) -> list[torch.Tensor]:
    """Copies of the BatchNorm running means of one backbone stage."""
    backbone = model.backbone
    return [
        m.running_mean.clone()
        for m in backbone.stage_modules(backbone.stage(stage))
        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None
    ]


class Recorder(pl.Callback):
    """Records, at the first batch of each epoch, what trains and how BatchNorm behaves."""

    def __init__(self) -> None:
        self.epochs: dict[int, dict[str, Any]] = {}
        self.at_start: dict[str, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.at_start = self._snapshot(trainer, pl_module)  # after any resume, before any epoch's unfreezing

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not batch_idx:
            self.epochs[trainer.current_epoch] = self._snapshot(trainer, pl_module)

    @staticmethod
    def _snapshot(trainer: pl.Trainer, pl_module: Any) -> dict[str, Any]:
        backbone = pl_module.backbone
        state: dict[str, Any] = {"groups": [(g["name"], g["lr"]) for g in trainer.optimizers[0].param_groups]}
        for stage in backbone.stages:
            params = list(backbone.stage_parameters(stage))
            bns = [m for m in backbone.stage_modules(stage) if isinstance(m, nn.BatchNorm2d)]
            state[stage.name] = {
                "requires_grad": {p.requires_grad for p in params},
                "bn_training": {m.training for m in bns},
                "bn_stats": bn_stats(pl_module, stage.name),
            }
        return state


# ------------------------------------------------------------------------- callbacks injected into ftlab runs


def _sigkill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(pl.Callback):
    """SIGKILL this process at the start of `epoch` (right after the previous epoch's checkpoints were written),
    or just before batch `batch` of that epoch (a kill in the middle of an epoch)."""

    def __init__(self, epoch: int, batch: int | None = None) -> None:
        self.epoch = epoch
        self.batch = batch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch and self.batch is None:
            _sigkill()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            _sigkill()


class KillDuringSave(pl.Callback):
    """From `epoch` on, the next checkpoint write to a file whose name contains `only` is cut short: half its bytes
    reach the file, then SIGKILL. Other writes go through."""

    def __init__(self, epoch: int, only: str = "") -> None:
        self.epoch = epoch
        self.only = only

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != self.epoch:
            return
        real_save = torch.save

        def cut_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            if self.only not in str(getattr(f, "name", f)):
                return real_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            with open(f, "wb") if isinstance(f, str | Path) else f as out:  # a path (atomic_write) or a file
                out.write(data[: len(data) // 2])
                out.flush()
                os.fsync(out.fileno())
            _sigkill()

        torch.save = cut_save


class PoisonBatch(pl.Callback):
    """Fill the images of the batch at global step `step` with NaN (a corrupt batch that makes the loss NaN), on
    every process or only on process `rank`."""

    def __init__(self, step: int, rank: int | None = None) -> None:
        self.step = step
        self.rank = rank

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            batch.inputs.fill_(float("nan"))


class DumpState(pl.Callback):
    """At the end of fit, write each process's trainable count, param groups, a weights checksum and the positions
    it trained on per epoch (as cached features or as images) to JSON, and its state dict beside it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.seen: dict[str, dict[str, list[int]]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, index: int) -> None:
        kinds = self.seen.setdefault(str(trainer.current_epoch), {"features": [], "images": []})
        kinds["features" if batch.features else "images"] += batch.indices.tolist()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state: dict[str, Any] = {
            "trainable": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
            "groups": [[g.get("name"), g["lr"], len(g["params"])] for g in trainer.optimizers[0].param_groups],
            "checksum": float(sum(p.detach().double().sum() for p in pl_module.parameters())),
            "val_acc": float(trainer.callback_metrics.get("val/acc", torch.tensor(-1.0))),
            "val_loss": float(trainer.callback_metrics.get("val/loss", torch.tensor(-1.0))),
            "epoch": trainer.current_epoch,
            "seen": self.seen,
        }
        Path(f"{self.path}.rank{trainer.global_rank}.json").write_text(json.dumps(state))
        torch.save(pl_module.state_dict(), f"{self.path}.rank{trainer.global_rank}.pt")  # every tensor, to compare


def in_process(args: list[str], log: Path) -> int:
    """A sweep launcher that runs `ftlab <args>` inside the test process (no interpreter start-up per run)."""
    import contextlib

    from datamodules.common import ConfigError
    from lightning_modules.cli.main import cli_main

    with log.open("a") as out, contextlib.redirect_stdout(out):
        try:
            cli_main(args)
        except ConfigError as err:
            print(f"ftlab: error: {err}")
            return 2
        except SystemExit as err:
            return err.code if isinstance(err.code, int) else 1
    return 0


class FailAtEpoch(pl.Callback):
    """Raise when `epoch` starts if the environment variable `FTLAB_TEST_FAIL` is set: a crash after checkpoints."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch and os.environ.get("FTLAB_TEST_FAIL"):
            raise RuntimeError("FailAtEpoch: the injected crash")
