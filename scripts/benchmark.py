"""Speed benchmark: finetune-lab against hand-written PyTorch, measured in one run on one machine.

Prints markdown tables of ratios (and the raw figures behind them):

- framework step time / a hand-written loop's (same model, batches, seed, optimizer); goal <= 1.05;
- frozen-backbone epoch without the feature cache / with it (epochs after the first); goal >= 10,
  with the same val accuracy within 0.5 points;
- data pipeline images/s / pure decoding of the same JPEGs (same workers); goal >= 0.7;
- `ftlab predict` images/s / a raw `inference_mode` loop's; goal >= 0.95;
- the switches (channels_last, bf16 / 16-mixed, torch.compile): step time relative to the default;
- on CPU, the frozen backbone's forward pass on ONNX Runtime / torch for EfficientNet-Lite0, MobileNetV2 and
  ResNet18 (goals >= 3.0, >= 2.0, >= 0.95), and FeatureCache's pass / a bare InferenceSession loop (>= 0.9);
- on CPU, fit + test of the own-images recipe on the dev cats-vs-dogs photos (its frozen Lite0 probe, and the whole
  recipe), the previous defaults (torch, glibc's allocator as it comes, two commands) against today's (`auto`, freed
  memory kept, `test_after_fit`), caches cold and warm (goals: the probe >= 2.0x, the recipe >= 1.3x, the same
  accuracy);
- what the dashboard's pictures cost: the time inside the `Dashboard` callback's hooks during a fit of the
  own-images recipe on the dev cats-vs-dogs photos, per epoch and at the end, against the epoch's time;
- `ftlab serve` of the own-images model under 1, 8 and 32 concurrent clients (`benchmark_serve.py`; goals: 2x the
  sequential throughput, p99 <= 1 s at 8 clients).

Uses the GPU when there is one. Usage:

    .venv/bin/python scripts/benchmark.py --out docs/benchmark.md    # everything: docs/benchmark.md
    .venv/bin/python scripts/benchmark.py --parts engines probe      # only the inference engines
    .venv/bin/python scripts/benchmark.py --quick                    # a smoke run on a tiny model
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from benchmark_serve import fit_own_images, serve_rows  # scripts/, beside this file
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from datamodules import DigitsDataModule, ImageFolderDataModule
from datamodules.batches import Batch, Transformed
from datamodules.common import DataConfig, write_generated
from datamodules.images import load_image, read_rgb
from datamodules.preresize import preresize
from datamodules.transforms import eval_transform, train_transform
from lightning_modules.backbones.backbone import build_backbone, data_config_dict
from lightning_modules.cli.main import cli_main
from lightning_modules.console import machine
from lightning_modules.finetuning.strategies import Freeze
from lightning_modules.module import FineTuneModule
from lightning_modules.reporting.callbacks import TrainingStateLogger
from lightning_modules.reporting.dashboard import Dashboard
from lightning_modules.reporting.predictions import PredictionWriter
from lightning_modules.speed.engines import onnxruntime_pass, torch_pass
from lightning_modules.speed.feature_cache import FeatureCache, compute_features
from lightning_modules.speed.memory import OFF, keep_freed_memory


@dataclass(frozen=True)
class Setup:
    """What the benchmark runs on."""

    backbone: str = "timm/tf_efficientnet_lite0"
    weights: str = "embedded"
    image_size: int = 64
    batch_size: int = 64
    steps: int = 30
    warmup: int = 5
    epochs: int = 4
    jpegs: int = 400
    jpeg_size: int = 224
    compile: bool = True


QUICK = Setup("timm/test_resnet", "none", 32, 16, 8, 2, 2, 48, 64, False)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
REPO = Path(__file__).resolve().parent.parent
PARTS = ("framework", "engines", "probe", "dashboard", "serve")


def sync() -> None:
    """Wait for the GPU, so wall times mean something."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def model(setup: Setup, **kw: Any) -> FineTuneModule:
    """The benchmark's model, with the same initial weights every call."""
    pl.seed_everything(0, verbose=False)
    return FineTuneModule(setup.backbone, setup.weights, setup.image_size, num_classes=10, **kw)


def digits(setup: Setup, **kw: Any) -> DigitsDataModule:
    """sklearn's digits at the setup's resolution, deterministic inputs."""
    config = data_config_dict(setup.backbone, setup.weights, setup.image_size)
    return DigitsDataModule(batch_size=setup.batch_size, num_workers=0, augment="none", data_config=config, **kw)


def trainer(root: str, **kw: Any) -> pl.Trainer:
    """A quiet single-device Trainer."""
    defaults: dict[str, Any] = {
        "accelerator": "auto",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": root,
    }
    return pl.Trainer(**{**defaults, **kw})


def best(run: Callable[[], float], repeats: int = 2) -> float:
    """The lowest of a few measurements (the least disturbed by the rest of the machine)."""
    return min(run() for _ in range(repeats))


# ------------------------------------------------------------------------------------------ step overhead


class StepTimer(pl.Callback):
    """Seconds between consecutive training batch starts (a whole step, framework included), and per epoch."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.epochs: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        sync()
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, *args: Any) -> None:
        sync()
        self.end = time.perf_counter()

    def on_train_epoch_start(self, *args: Any) -> None:
        self.epoch_start = time.perf_counter()

    def on_train_epoch_end(self, *args: Any) -> None:  # after this epoch's validation
        self.epochs.append(time.perf_counter() - self.epoch_start)

    def step_times(self) -> list[float]:
        """One duration per step."""
        marks = [*self.starts, self.end]
        return [b - a for a, b in itertools.pairwise(marks)]


def fixed_batches(setup: Setup) -> list[Batch]:
    """The first `steps` training batches of digits, decoded and transformed once, kept in memory."""
    data = digits(setup)
    data.setup("fit")
    loader = data.loader("train", data.datasets["train"])
    batches = [b for b in loader if b.size == setup.batch_size]  # one shape: no recompilation
    return [batches[i % len(batches)] for i in range(setup.steps)]


def hand_loop(setup: Setup, batches: list[Batch], **kw: Any) -> float:
    """Median step time of the plain PyTorch loop: same model, optimizer (AdamW over the same groups), batches."""
    net = model(setup, **kw).to(DEVICE).train()
    net.configure_model()  # what Lightning calls: channels_last, compile
    optimizer = torch.optim.AdamW(net.trainable_param_groups())
    times = []
    for batch in batches:
        sync()
        start = time.perf_counter()
        x, y = batch.inputs.to(DEVICE), batch.targets.to(DEVICE)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times[setup.warmup :])


def framework_steps(setup: Setup, batches: list[Batch], root: str, precision: str = "32-true", **kw: Any) -> float:
    """Median step time of `Trainer.fit` on the same batches, with the per-step callbacks and logger of `ftlab`."""
    timer = StepTimer()
    logger = pl.loggers.TensorBoardLogger(root, name="steps")
    callbacks = [timer, TrainingStateLogger()]
    run = trainer(
        root, max_steps=len(batches), limit_val_batches=0, logger=logger, precision=precision, callbacks=callbacks
    )
    run.fit(model(setup, **kw), train_dataloaders=DataLoader(batches, batch_size=None))  # type: ignore[arg-type]
    return statistics.median(timer.step_times()[setup.warmup :])


# ------------------------------------------------------------------------------------------ feature cache


def frozen_epochs(setup: Setup, root: str, store: str) -> tuple[list[float], float, float]:
    """Epoch times, fit wall time and final val accuracy of a linear probe (backbone frozen)."""
    timer = StepTimer()
    run = trainer(root, max_epochs=setup.epochs, callbacks=[Freeze(), FeatureCache(store=store), timer])
    start = time.perf_counter()
    run.fit(model(setup), datamodule=digits(setup))
    return timer.epochs, time.perf_counter() - start, float(run.callback_metrics["val/acc"])


# ------------------------------------------------------------------------------------------ data pipeline


def write_jpegs(root: Path, count: int) -> list[Path]:
    """`count` photo JPEGs of 500x375 (crops of sklearn's sample photos) in two class folders."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        left, top = int(rng.integers(0, 100)), int(rng.integers(0, 40))
        image = photo.crop((left, top, left + 500, top + 375))
        path = root / ("cat" if i % 2 else "dog") / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)
        paths.append(path)
    return paths


class DecodeOnly(Dataset):
    """Decodes a file and returns only its size: the floor any pipeline pays."""

    def __init__(self, paths: list[str], decode: Callable[[str], Any]) -> None:
        self.paths = paths
        self.decode = decode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, ...]:
        return tuple(self.decode(self.paths[index]).shape)


def decode_pil(path: str) -> np.ndarray:
    """PIL decode to an RGB array."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def decode_torchcodec(path: str) -> torch.Tensor:
    """TorchCodec (libjpeg-turbo) decode to an RGB tensor."""
    from torchcodec.decoders import decode_jpeg

    return decode_jpeg(path, mode="RGB")  # type: ignore[return-value]  # one source: one tensor


def per_second(loader: Iterable[Any], count: Callable[[Any], int]) -> float:
    """Items per second over a second pass of `loader` (the first warms workers and caches)."""
    for _ in loader:
        pass
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += count(batch)
    return n / (time.perf_counter() - start)


def files_of(data: ImageFolderDataModule) -> Any:
    """The raw (untransformed) training files."""
    return data.datasets["train"].dataset


def loader_of(dataset: Dataset, workers: int, collate: Callable[[Any], Any]) -> DataLoader:
    """Batches of 32 with the pipeline's worker count."""
    return DataLoader(dataset, batch_size=32, num_workers=workers, persistent_workers=workers > 0, collate_fn=collate)


def pipeline_rates(setup: Setup, root: Path) -> dict[str, float]:
    """Images per second: the training loader, pure decoding with the same workers, and each stage alone."""
    write_jpegs(root, setup.jpegs)
    config = data_config_dict("torchvision/resnet18", "none", setup.jpeg_size)
    data = ImageFolderDataModule(root=str(root), batch_size=32, augment="basic", data_config=config)
    data.setup("fit")
    train = Transformed(files_of(data), eval_transform(DataConfig.from_dict(config)))
    paths = [train.name(i) for i in range(len(train))]
    workers = data.num_workers

    small_root = root.with_name(f"{root.name}-small")
    preresize(root, small_root, round(setup.jpeg_size / 0.875))
    small = ImageFolderDataModule(root=str(small_root), batch_size=32, augment="basic", data_config=config)
    small.setup("fit")
    rates = {
        "pipeline": best(lambda: per_second(data.train_dataloader(), lambda b: b.size)),
        "pipeline on the pre-resized copy": best(lambda: per_second(small.train_dataloader(), lambda b: b.size)),
        "decode PIL": best(lambda: per_second(loader_of(DecodeOnly(paths, decode_pil), workers, list), len)),
        "decode TorchCodec": best(
            lambda: per_second(loader_of(DecodeOnly(paths, decode_torchcodec), workers, list), len)
        ),
    }
    evaluation = Transformed(files_of(data), eval_transform(DataConfig.from_dict(config)))
    rates["pipeline, eval transform"] = best(lambda: per_second(data.loader("val", evaluation), lambda b: b.size))
    dc = DataConfig.from_dict(config)
    pil_images = [read_rgb(p) for p in paths[:64]]
    tensors = [load_image(p) for p in paths[:64]]
    resize, augment = eval_transform(dc), train_transform(dc, "basic")
    single: dict[str, Callable[[int], Any]] = {  # one process, one image at a time
        "1 process: decode PIL (read_rgb)": lambda i: read_rgb(paths[i]),
        "1 process: decode TorchCodec (load_image)": lambda i: load_image(paths[i]),
        "1 process: eval transform on the PIL image": lambda i: resize(pil_images[i]),
        "1 process: eval transform on the tensor": lambda i: resize(tensors[i]),
        "1 process: basic augment on the tensor": lambda i: augment(tensors[i]),
    }
    for name, fn in single.items():
        start = time.perf_counter()
        for i in range(len(tensors)):
            fn(i)
        rates[name] = len(tensors) / (time.perf_counter() - start)
    return {**rates, "workers": float(workers)}


# ------------------------------------------------------------------------------------------ predict


def predict_rates(setup: Setup, root: str) -> tuple[float, float, int]:
    """Images per second of `Trainer.predict` with ftlab's writer, and of a raw inference_mode loop."""
    data = digits(setup, test_fraction=0.5)
    net = model(setup).to(DEVICE)

    def framework() -> float:
        run = trainer(root, callbacks=[PredictionWriter()])
        start = time.perf_counter()
        run.predict(net, datamodule=data, return_predictions=False)
        return time.perf_counter() - start

    def raw() -> float:
        net.eval()
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in data.predict_dataloader():
                net(batch.inputs.to(DEVICE)).softmax(dim=1).cpu()
        return time.perf_counter() - start

    raw()  # warm-up
    count = len(data.datasets["test"])
    return count / best(framework, 3), count / best(raw, 3), count


# ------------------------------------------------------------------------------------------ inference engines

ENGINE_BACKBONES = (  # EfficientNet-Lite0 with its embedded ImageNet weights; the others need a download for theirs
    ("timm/tf_efficientnet_lite0", "embedded"),
    ("torchvision/mobilenet_v2", "none"),
    ("torchvision/resnet18", "none"),
)


def rate(run: Callable[[torch.Tensor], Any], batches: list[torch.Tensor], repeats: int = 3) -> float:
    """Images per second of `run` over `batches`, the best of `repeats` after one warm-up batch."""
    run(batches[0])
    count = sum(len(b) for b in batches)
    return count / best(lambda: timed(lambda: [run(b) for b in batches]), repeats)


def timed(work: Callable[[], Any]) -> float:
    """Seconds `work()` takes."""
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def engine_rows(setup: Setup, root: Path) -> list[str]:
    """The frozen backbone's forward pass, torch against ONNX Runtime (`feature_cache.engine`), per backbone;
    then the framework's cached-feature pass against a bare `onnxruntime.InferenceSession` loop on the same
    batches (both after the export, which is cached)."""
    import onnxruntime as ort

    size = setup.jpeg_size
    backbones = ENGINE_BACKBONES if setup.compile else (("timm/test_resnet", "none"),)
    torch.manual_seed(0)
    batches = [torch.rand(32, 3, size, size).contiguous(memory_format=torch.channels_last) for _ in range(12)]
    rows = [
        f"| backbone (feature pass, {len(batches)} batches of 32 at {size} px, eval mode) | torch | ONNX Runtime | "
        "ratio | goal | export | max difference |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, weights in backbones:
        backbone = build_backbone(name, weights, size, 3).eval().to(memory_format=torch.channels_last)
        by_torch = torch_pass(backbone, torch.device("cpu"))
        onnx_dir = root / "onnx" / name.replace("/", "_")
        start = time.perf_counter()
        by_ort = onnxruntime_pass(backbone, batches[0], onnx_dir)  # the export (a new folder: not cached)
        export_s = time.perf_counter() - start
        diff = max(float((by_torch(b) - by_ort(b)).abs().max()) for b in batches)
        t, o = rate(by_torch, batches), rate(by_ort, batches)
        goal = {"timm/tf_efficientnet_lite0": ">= 3.0", "torchvision/mobilenet_v2": ">= 2.0"}.get(name, ">= 0.95")
        rows.append(
            f"| {name} ({weights} weights) | {t:.0f} img/s | {o:.0f} img/s | {o / t:.2f} | {goal} | {export_s:.1f} s "
            f"| {diff:.1g} |"
        )
    # the last backbone: FeatureCache's pass (loader of batches, parity check, concatenation) against bare ORT
    count = sum(len(b) for b in batches)
    labelled = [Batch(b, torch.zeros(len(b), dtype=torch.long), torch.arange(len(b)), [], "val") for b in batches]
    loader: DataLoader[Batch] = DataLoader(labelled, batch_size=None)  # type: ignore[arg-type]  # a list is a dataset
    cpu = torch.device("cpu")
    framework = count / best(lambda: timed(lambda: compute_features(backbone, loader, cpu, "onnxruntime", onnx_dir)), 3)
    (path,) = onnx_dir.glob("*.onnx")

    def bare_loop() -> list[Any]:  # what one would write by hand: a session on the exported file, then the batches
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return [session.run(None, {"images": b.numpy()}) for b in batches]

    bare = count / best(lambda: timed(bare_loop), 3)
    rows.append(
        f"| {name}: FeatureCache's pass (session, parity check, loader, concatenation) vs a bare InferenceSession "
        f"loop (session, batches) | {framework:.0f} img/s | {bare:.0f} img/s | {framework / bare:.2f} | >= 0.9 | | |"
    )
    return rows


# The end-to-end rows: the previous defaults (torch engines, glibc's allocator as it comes; fit, then `ftlab test` in
# a second process) against today's (`auto` engines, freed memory kept, `test_after_fit`: one process), both with
# finetune-lab's caches emptied (no ONNX export, no cached feature: ~/.cache/finetune-lab removed), and today's again
# with them warm. HOME stays the user's: a fresh
# HOME would also rebuild matplotlib's font cache and timm's, which no second run of a user pays.
FTLAB_CACHE = Path.home() / ".cache" / "finetune-lab"
OLD_DEFAULTS = ["--feature_cache.engine=torch", "--model.inference_engine=torch", "--test_after_fit=false"]
OLD_ENV = {OFF: "0"}  # and glibc's allocator as it comes (speed/memory.py)


def probe_rows(data: Path, root: Path) -> list[str]:
    """Fit + test of the own-images recipe on the dev cats-vs-dogs photos, whole `ftlab` processes timed: its frozen
    Lite0 probe (3 epochs on cached features) and the whole recipe (5 epochs, the last 2 fine-tuning), each with the
    previous defaults and with today's, cold and warm caches; the ratio to the previous defaults and the accuracy."""
    photos = data / "cats_vs_dogs" / "PetImages"
    if not photos.is_dir():
        return [f"(end-to-end rows not run: no {photos}; pass --data DIR, the dev data's folder)"]
    rows = [
        f"| own-images recipe on {photos.parent.name} dev photos, fit + test, whole processes | wall | vs previous "
        "defaults | val acc (best) | test acc |",
        "|---|---|---|---|---|",
    ]
    for recipe, epochs in (("frozen Lite0 probe", 3), ("whole recipe", 5)):
        base: tuple[float, float] | None = None
        for label, extra, cold in (
            ("previous defaults (torch; fit, then ftlab test), caches cold", OLD_DEFAULTS, True),
            ("defaults, caches cold", [], True),
            ("defaults, caches warm", [], False),
        ):
            name = f"e{epochs}-row{len(rows)}"
            if cold:
                shutil.rmtree(FTLAB_CACHE, ignore_errors=True)
            env = {**os.environ, "PYTHONPATH": str(REPO), **(OLD_ENV if extra else {})}
            common = [
                "--config",
                str(REPO / "experiments" / "data" / "image_folder.yaml"),
                f"--data.init_args.root={photos}",
                f"--trainer.logger.init_args.save_dir={root / 'runs'}",
                f"--trainer.logger.init_args.name={name}",
                f"--trainer.max_epochs={epochs}",
            ]
            commands = [["fit", *common, *extra]]
            if extra:
                commands.append(["test", *common, "--ckpt_path=best", "--model.inference_engine=torch"])
            start = time.perf_counter()
            for args in commands:
                done = subprocess.run(
                    [sys.executable, "-m", "lightning_modules.cli.main", *args], env=env, cwd=root, capture_output=True
                )
                if done.returncode:
                    raise RuntimeError(f"ftlab {args[0]} ({recipe}, {label}) failed:\n{done.stderr[-2000:]!r}")
            wall = time.perf_counter() - start
            run = root / "runs" / name / "version_0"
            test = float(json.loads((run / "metrics.json").read_text())["acc"])
            val = max(float(r["val/acc"]) for r in csv.DictReader((run / "metrics.csv").open()) if r.get("val/acc"))
            base = base or (wall, test)
            rows.append(
                f"| {recipe}: {label} | {wall:.1f} s | {base[0] / wall:.2f}x | {val:.4f} | {test:.4f} "
                f"({(test - base[1]) * 100:+.1f} points) |"
            )
    return rows


def dashboard_rows(data: Path, root: Path, epochs: int = 5) -> list[str]:
    """Seconds spent in each `Dashboard` hook during `ftlab fit` of the own-images recipe on the dev cats-vs-dogs
    photos (in this process; each hook wrapped by a timer), against the fit's mean epoch time."""
    photos = data / "cats_vs_dogs" / "PetImages"
    if not photos.is_dir():
        return [f"(dashboard cost not measured: no {photos}; pass --data DIR, the dev data's folder)"]
    spent: dict[str, list[float]] = {}
    hooks = (
        "on_fit_start",
        "on_train_batch_start",
        "on_validation_batch_end",
        "on_validation_epoch_end",
        "on_train_epoch_end",
        "on_fit_end",
    )
    originals = {hook: getattr(Dashboard, hook) for hook in hooks}

    def timer(hook: str) -> Callable[..., None]:
        def timed_hook(self: Dashboard, *args: Any) -> None:
            start = time.perf_counter()
            originals[hook](self, *args)
            spent.setdefault(hook, []).append(time.perf_counter() - start)

        return timed_hook

    for hook in hooks:
        setattr(Dashboard, hook, timer(hook))
    try:
        start = time.perf_counter()
        cli = cli_main(
            [
                "fit",
                "--config",
                str(REPO / "experiments" / "data" / "image_folder.yaml"),
                f"--data.init_args.root={photos}",
                f"--trainer.logger.init_args.save_dir={root / 'runs'}",
                f"--trainer.max_epochs={epochs}",
                "--trainer.enable_progress_bar=false",
            ]
        )
        wall = time.perf_counter() - start
    finally:
        for hook, original in originals.items():
            setattr(Dashboard, hook, original)
    epoch_s = [float(row["time/epoch_s"]) for row in csv_rows(Path(str(cli.trainer.log_dir)) / "metrics.csv")]
    mean_epoch = statistics.fmean(epoch_s)
    per_epoch = {h: sum(spent.get(h, [])) / epochs for h in hooks if h not in ("on_fit_start", "on_fit_end")}
    rows = [
        f"| Dashboard on the own-images recipe, {photos.parent.name} dev photos ({epochs} epochs, fit {wall:.0f} s, "
        f"mean epoch {mean_epoch:.1f} s) | seconds | share of an epoch |",
        "|---|---|---|",
    ]
    for hook, seconds in per_epoch.items():
        rows.append(f"| {hook}, per epoch | {seconds:.3f} | {seconds / mean_epoch:.2%} |")
    total = sum(per_epoch.values())
    rows.append(f"| all per-epoch pictures and records | {total:.3f} | {total / mean_epoch:.2%} |")
    for hook in ("on_fit_start", "on_fit_end"):
        rows.append(f"| {hook} (once per fit) | {sum(spent.get(hook, [])):.3f} | |")
    return rows


def csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a run's metrics.csv that hold `time/epoch_s`."""
    with path.open() as f:
        return [row for row in csv.DictReader(f) if row.get("time/epoch_s")]


# ------------------------------------------------------------------------------------------ report


def run(setup: Setup, parts: list[str], data: Path, serve_model: Path | None = None) -> str:
    """The measurements of `parts`; the markdown report."""
    command = f"python scripts/benchmark.py{' --quick' if setup == QUICK else ''} --parts {' '.join(parts)}"
    lines = ["# Benchmarks", "", f"Written by `{command}` on {datetime.date.today()}; machine: {machine()}.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        if "engines" in parts and DEVICE.type == "cpu":
            lines += [*engine_rows(setup, Path(tmp)), ""]
        if "probe" in parts and DEVICE.type == "cpu" and setup != QUICK:  # two minutes of real photos
            lines += [*probe_rows(data, Path(tmp)), ""]
        if "dashboard" in parts and setup != QUICK:  # a fit of a few minutes on real photos
            lines += [*dashboard_rows(data, Path(tmp)), ""]
        if "serve" in parts and setup != QUICK:  # a fit of a few minutes, unless given the model; 4 servers
            photos = data / "cats_vs_dogs" / "PetImages"
            lines += [*serve_rows(serve_model or fit_own_images(photos, Path(tmp) / "fit"), photos), ""]
        if "framework" in parts:
            lines += [
                f"Model: {setup.backbone} ({setup.weights}) at {setup.image_size} px.",
                "",
                *framework_rows(setup, tmp),
            ]
    return "\n".join(lines).rstrip("\n") + "\n"


def framework_rows(setup: Setup, tmp: str) -> list[str]:
    """Step time, feature cache, data pipeline, predict and the switches, each against its hand-written reference."""
    lines: list[str] = []
    batches = fixed_batches(setup)
    hand = best(lambda: hand_loop(setup, batches))
    fw = best(lambda: framework_steps(setup, batches, tmp))
    uncached, fit_plain, acc_plain = frozen_epochs(setup, tmp, "off")
    cached, fit_cached, acc_cached = frozen_epochs(setup, tmp, "memory")
    after = statistics.mean(uncached[1:]) / statistics.mean(cached[1:])
    pipe = pipeline_rates(setup, Path(tmp) / "jpegs")
    floor = max(pipe["decode PIL"], pipe["decode TorchCodec"])
    fw_rate, raw_rate, count = predict_rates(setup, tmp)
    lines += [
        "| measure | finetune-lab | reference | ratio | goal |",
        "|---|---|---|---|---|",
        f"| train step time (batch {setup.batch_size}) vs hand-written loop | {fw * 1e3:.1f} ms | "
        f"{hand * 1e3:.1f} ms | {fw / hand:.3f} | <= 1.05 |",
        f"| frozen epoch, cache vs none (epochs 2-{setup.epochs}, mean) | {statistics.mean(cached[1:]):.3f} s | "
        f"{statistics.mean(uncached[1:]):.3f} s | {after:.1f}x faster | >= 10x |",
        f"| frozen fit of {setup.epochs} epochs, cache vs none (wall, incl. the feature pass) | {fit_cached:.1f} s "
        f"| {fit_plain:.1f} s | {fit_plain / fit_cached:.1f}x faster | |",
        f"| val accuracy after the frozen fit, cache vs none | {acc_cached:.4f} | {acc_plain:.4f} | "
        f"{abs(acc_cached - acc_plain) * 100:.2f} points apart | <= 0.5 points |",
        f"| data pipeline ({setup.jpegs} JPEGs 500x375 -> {setup.jpeg_size} px, basic augment, "
        f"{int(pipe['workers'])} workers) vs pure decoding | {pipe['pipeline']:.0f} img/s | {floor:.0f} img/s | "
        f"{pipe['pipeline'] / floor:.2f} | >= 0.7 |",
        f"| the same on a copy pre-resized by scripts/preresize.py vs pure decoding of the originals | "
        f"{pipe['pipeline on the pre-resized copy']:.0f} img/s | {floor:.0f} img/s | "
        f"{pipe['pipeline on the pre-resized copy'] / floor:.2f} | |",
        f"| the same without augmentation (eval transform) vs pure decoding | "
        f"{pipe['pipeline, eval transform']:.0f} img/s | {floor:.0f} img/s | "
        f"{pipe['pipeline, eval transform'] / floor:.2f} | |",
        f"| predict ({count} images, writer included) vs raw inference_mode loop | {fw_rate:.0f} img/s | "
        f"{raw_rate:.0f} img/s | {fw_rate / raw_rate:.3f} | >= 0.95 |",
        "",
        "| data stage | images/s |",
        "|---|---|",
        *(f"| {k} | {v:.0f} |" for k, v in pipe.items() if k != "workers"),
        "",
        "| switch (train step, same batches) | step time | vs the default |",
        "|---|---|---|",
        f"| default (32-true, channels_last) | {fw * 1e3:.1f} ms | 1.00 |",
    ]
    for name, kw in switches(setup).items():
        time_ = framework_steps(setup, batches, tmp, **kw)
        lines.append(f"| {name} | {time_ * 1e3:.1f} ms | {time_ / fw:.2f} |")
    return lines


def switches(setup: Setup) -> dict[str, dict[str, Any]]:
    """The config switches to time, by name."""
    found: dict[str, dict[str, Any]] = {
        "channels_last off (NCHW)": {"channels_last": False},
        "bf16-mixed": {"precision": "bf16-mixed"},
    }
    if DEVICE.type == "cuda":
        found["16-mixed"] = {"precision": "16-mixed"}
    if setup.compile:
        found["torch.compile (compile time excluded: warm-up steps)"] = {"compile": True}
    return found


def main(argv: list[str] | None = None) -> None:
    """Run and print (and optionally save) the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and data: checks the script, not speed")
    parser.add_argument(
        "--out", type=Path, help="also write the report here (docs/benchmark.md: above its hand-written part)"
    )
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (default: all)")
    parser.add_argument(
        "--data", type=Path, default=REPO.parent / "shared" / "data", help="the dev data, for the probe"
    )
    parser.add_argument("--serve_model", type=Path, help="serve: this checkpoint (else the recipe is fitted first)")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as every model's setup does: the hand-written loops share the fit's allocator setting
    setup = QUICK if args.quick else Setup()
    if DEVICE.type == "cuda":
        setup = replace(setup, image_size=224, batch_size=128)
    report = run(setup, args.parts, args.data, args.serve_model)
    print(report)
    if args.out:
        write_generated(args.out, report)


if __name__ == "__main__":
    main()
