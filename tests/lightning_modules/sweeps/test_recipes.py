"""scripts/results.py in quick mode on tiny data in the real layouts: rows run, the table is rebuilt from the run
folders alone, and finished rows are never rerun."""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import pytest

from datamodules.common import ConfigError
from lightning_modules.sweeps.recipes import load_plan, main
from tests.helpers import REPO
from tests.helpers.data import write_class_folders, write_mnist
from tests.helpers.runs import in_process

PLAN = REPO / "scripts" / "results.yaml"
ROWS = ["mnist-mlp", "cifar10-simple_cnn", "cats_vs_dogs-own_images"]
CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture
def dev_data(tmp_path: Path) -> Path:
    """The shared data folder's layout, tiny: MNIST IDX, the CIFAR-10 JPEG archive, PetImages, the pet set."""
    data = tmp_path / "data"
    write_mnist(data / "mnist", gz=True, n_train=50, n_test=20)
    write_class_folders(data / "cats_vs_dogs" / "PetImages", {"Cat": 10, "Dog": 10})
    write_class_folders(data / "pet_expressions" / "Master Folder" / "train", {"Angry": 5, "happy": 5, "Sad": 5})
    write_class_folders(data / "pet_expressions" / "Master Folder" / "valid", {"Angry": 2, "happy": 2, "Sad": 2})
    write_class_folders(tmp_path / "cifar" / "train", dict.fromkeys(CIFAR, 5))
    with tarfile.open(data / "cifar10_train_jpeg.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "cifar" / "train", arcname="train")
    return data


def test_every_row_of_the_plan_names_a_recipe_that_exists() -> None:
    rows, not_run = load_plan(PLAN)
    assert {r.name for r in rows} >= set(ROWS)
    for recipe in [p for r in rows for p in r.recipe] + list(not_run):
        assert (REPO / recipe).is_file(), recipe


@pytest.mark.slow
def test_quick_mode_runs_rows_writes_the_table_and_skips_finished_rows(in_tmp: Path, dev_data: Path) -> None:
    out, doc = in_tmp / "results", in_tmp / "docs" / "results.md"
    args = ["--data", str(dev_data), "--plan", str(PLAN), "--out", str(out), "--quick", "--only", *ROWS]
    assert main([*args, "--doc", str(doc)], launcher=in_process) == 0

    with (out / "results.csv").open() as f:
        table = {r["row"]: r for r in csv.DictReader(f)}
    assert list(table) == ROWS
    mnist = table["mnist-mlp"]
    assert (mnist["train"], mnist["val"], mnist["test"]) == ("40", "10", "20")  # 80/20 of train; t10k is test
    cifar = table["cifar10-simple_cnn"]
    # carved: 20% test, then 10% val, which is 4 of 40 images: fewer than the 10 classes, so one of each
    assert (cifar["train"], cifar["val"], cifar["test"]) == ("30", "10", "10")
    assert (out / "data" / "cifar10" / "train" / "truck").is_dir()
    for name, row in table.items():
        metrics = json.loads((out / "runs" / name / "version_0" / "metrics.json").read_text())
        assert float(row["test_acc"]) == pytest.approx(metrics["acc"])
        assert int(row["epochs"]) == 1 and float(row["fit_s"]) > 0
    assert "timm/tf_efficientnet_lite0 (embedded, 32 px)" in table["cats_vs_dogs-own_images"]["backbone"]
    text = (out / "results.md").read_text()
    assert doc.read_text() == text and doc.with_suffix(".csv").is_file()
    assert "| mnist | `experiments/mnist/mlp.yaml` | scratch/mlp (none, 32 px) | 40 / 10 / 20 |" in text
    assert "val_acc >= 0.95: " in text and "Recipes not in this table:" in text

    calls: list[list[str]] = []

    def counting(ftlab_args: list[str], log: Path) -> int:
        calls.append(ftlab_args)
        return 0

    assert main(args, launcher=counting) == 0
    assert calls == []  # finished rows are not rerun
    (out / "results.md").unlink()
    assert main([*args, "--collect-only"], launcher=in_process) == 0
    assert (out / "results.md").read_text() == text  # rebuilt from the run folders alone


def test_missing_data_and_unknown_rows_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "o")
    assert main(["--data", str(tmp_path), "--plan", str(PLAN), "--out", out, "--only", "mnist-mlp"]) == 2
    assert f"{tmp_path / 'mnist'} not found: DATA must hold mnist/" in capsys.readouterr().out
    assert main(["--data", str(tmp_path), "--plan", str(PLAN), "--out", out, "--only", "mnist-mpl"]) == 2
    assert "--only: no rows ['mnist-mpl']" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="does not exist"):
        load_plan(tmp_path / "none.yaml")
