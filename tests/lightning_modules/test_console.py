"""What `ftlab` prints: the data summary at setup, skipped files named, no known noise, a bar that fits 80 columns."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from lightning_modules.console import CompactProgressBar
from tests.helpers import REPO
from tests.helpers.data import write_class_folders


@pytest.mark.slow
def test_setup_summary_names_the_classes_splits_and_the_empty_file(tmp_path: Path) -> None:
    write_class_folders(tmp_path / "photos", {"cat": 12, "dog": 12})
    (tmp_path / "photos" / "cat" / "zero.jpg").write_bytes(b"")
    args = [
        "fit",
        "--model.backbone=timm/test_resnet",
        "--model.weights=none",
        "--model.image_size=32",
        "--data=datamodules.ImageFolderDataModule",
        "--data.root=photos",
        "--data.batch_size=4",
        "--data.num_workers=0",
        "--trainer.max_epochs=1",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "80"}
    run = subprocess.run(
        [sys.executable, "-m", "lightning_modules.cli.main", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Data: 2 classes (cat, dog); images: train 17, val 2, test 5" in run.stderr
    listed = "runs/default/version_0/bad_images.csv"
    assert f"Skipped 1 unreadable file(s), each listed with its reason in {listed}" in run.stderr
    assert "zero.jpg" in (tmp_path / listed).read_text()
    assert "litlogger" not in run.stderr and "LeafSpec" not in run.stderr  # known third-party noise
    assert "feature_cache.py" not in run.stderr  # our notices come without file paths
    bars = [line for line in run.stdout.replace("\r", "\n").splitlines() if line.startswith("Epoch 0")]
    assert bars and "loss=" in bars[-1] and "val/acc=" in bars[-1] and "v_num" not in run.stdout


def test_the_progress_bar_shows_the_loss_and_the_watched_metric_in_80_columns() -> None:
    logged = {"train/loss_step": 0.41234, "train/loss_epoch": 0.5, "val/loss": 0.3, "val/acc": 0.875, "val/f1": 0.8}
    bar = CompactProgressBar()
    trainer = SimpleNamespace(
        early_stopping_callback=SimpleNamespace(monitor="val/acc"), checkpoint_callback=None, loggers=[]
    )
    trainer.progress_bar_metrics = {**logged, "v_num": 3}
    shown = bar.get_metrics(trainer, None)
    assert shown == {"loss": 0.41234, "val/acc": 0.875}
    postfix = Tqdm(total=1, file=io.StringIO())
    postfix.set_postfix(shown, refresh=False)  # formatted as the bar formats it
    assert postfix.postfix == "loss=0.412, val/acc=0.875"
    line = Tqdm.format_meter(  # epoch 119 of 1,250 steps at 0.2 s each, in an 80-column terminal
        1249, 1250, 250.0, ncols=80, prefix="Epoch 119", postfix=postfix.postfix, bar_format=bar.BAR_FORMAT
    )
    assert len(line) <= 80 and line.endswith(", loss=0.412, val/acc=0.875]"), line
