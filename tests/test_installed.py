"""The installed package behaves as the checkout: a wheel installed without `-e`, `ftlab` run from another folder
with a config that sets only the model and the data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.helpers.data import write_class_folders

pytestmark = pytest.mark.slow  # a wheel built and installed

POISON = '''
import lightning.pytorch as pl


class PoisonBatch(pl.Callback):
    """NaN images from the third step on: the loss becomes NaN."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= 2:
            batch.inputs.fill_(float("nan"))
'''


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv holding a wheel of this project (no -e); torch and the rest come from the test's own environment."""
    root = tmp_path_factory.mktemp("installed")
    source = root / "source"  # build from a copy: an in-tree build would leave build/ and egg-info in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("lightning_modules", "datamodules"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", root / "wheel", source], check=True)
    (wheel,) = (root / "wheel").glob("finetune_lab-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", python, "install", "--no-deps", "--no-index", wheel], check=True)
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    # the torch stack of this environment, after the venv's own packages (a .pth line: its own .pth files, such
    # as this checkout's editable install, are not run)
    Path(purelib, "torch_stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


def _ftlab(bin_dir: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(cwd), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([bin_dir / "ftlab", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_installed_ftlab_keeps_the_defaults_from_another_folder(installed: Path, tmp_path: Path) -> None:
    where = subprocess.run(
        [installed / "python", "-c", "import lightning_modules; print(lightning_modules.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    ).stdout
    assert str(installed.parent) in where and str(REPO) not in where
    write_class_folders(tmp_path / "photos", {"cat": 8, "dog": 8})
    (tmp_path / "run.yaml").write_text(
        "model: {backbone: timm/test_resnet, weights: none, image_size: 32}\n"
        "data:\n  class_path: datamodules.ImageFolderDataModule\n"
        "  init_args: {root: photos, batch_size: 4, num_workers: 0}\n"
        "trainer: {max_epochs: 2, enable_progress_bar: false}\n"
    )
    fit = _ftlab(installed, tmp_path, "fit", "--config", "run.yaml")
    assert fit.returncode == 0, fit.stderr[-3000:]
    run = tmp_path / "runs" / "default" / "version_0"  # the packaged defaults' logger
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run / "checkpoints").glob("best-epoch*.ckpt"))) == 1
    test = _ftlab(installed, tmp_path, "test", "--config", "run.yaml", "--ckpt_path", "best")
    assert test.returncode == 0, test.stderr[-3000:]
    assert (run / "report.md").is_file() and (run / "metrics.json").is_file()
    assert not (tmp_path / "runs" / "default" / "version_1").exists()  # the test wrote into the fit's run

    (tmp_path / "poison.py").write_text(POISON)
    nan = _ftlab(installed, tmp_path, "fit", "--config", "run.yaml", "--trainer.callbacks+=poison.PoisonBatch")
    assert nan.returncode == 1
    assert "ftlab: error: training loss became nan at epoch 0, step 2" in nan.stderr
