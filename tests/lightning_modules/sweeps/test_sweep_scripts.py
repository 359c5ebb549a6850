"""scripts/compare_backbones.py, grid_search.py, kfold.py, multi_seed.py on tiny models and digits.

The sweeps run `ftlab` in this process (tests.helpers.runs.in_process) to save an interpreter start-up per run; one
test runs the real script with its real subprocesses. Every table number is checked against the run's own files.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import REPO
from tests.helpers.runs import in_process

pytestmark = pytest.mark.slow  # sweeps of several fits each

BASE = """
trainer:
  max_epochs: 2
  limit_train_batches: 3
  limit_val_batches: 2
  limit_test_batches: 2
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:  # the defaults' list, with a test report without image grids (drawing them is most of a tiny run)
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {monitor: val/acc, mode: max, filename: "best-{epoch}", save_top_k: 1}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {filename: last, save_top_k: 1, enable_version_counter: false}
    - class_path: lightning_modules.TrainingStateLogger
    - class_path: lightning_modules.TestReport
      init_args: {grid_size: 0, layer_figures: false}
    - class_path: tests.helpers.faults.FailAtEpoch
      init_args: {epoch: 1}
model:
  backbone: scratch/mlp
  weights: none
  image_size: 16
  optimizer: {class_path: torch.optim.AdamW}  # a class for the grid's model.optimizer.init_args.lr
data:
  class_path: datamodules.DigitsDataModule
  init_args: {batch_size: 32, num_workers: 0}
"""


@pytest.fixture
def sweep_dir(in_tmp: Path) -> Path:
    """A temporary working directory with the tiny base experiment in `base.yaml`."""
    (in_tmp / "base.yaml").write_text(BASE)
    return in_tmp


@pytest.fixture
def scripts() -> Iterator[Any]:
    """Import a script of scripts/ by module name."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "scripts"))


class Recorder:
    """An in-process launcher that remembers what it ran."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, args: list[str], log: Path) -> int:
        self.calls.append(args)
        return in_process(args, log)

    def runs(self, command: str) -> list[str]:
        """The runs a command was launched for (named by the folder of their run.yaml)."""
        return [Path(a).parent.name for c in self.calls if c[0] == command for a in c if a.endswith("run.yaml")]


def table(out: Path) -> list[dict[str, str]]:
    with (out / "results.csv").open() as f:
        return list(csv.DictReader(f))


def assert_rows_match_runs(out: Path, rows: list[dict[str, str]]) -> None:
    """Each number of the table equals the run's own metrics.json or TensorBoard scalar."""
    for row in rows:
        run = out / "runs" / row["run"] / "version_0"
        metrics = json.loads((run / "metrics.json").read_text())
        events = EventAccumulator(str(run), size_guidance={"scalars": 0})
        events.Reload()
        series = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
        assert float(row["test_acc"]) == pytest.approx(metrics["acc"], abs=1e-12)
        assert float(row["test_f1"]) == pytest.approx(metrics["f1"], abs=1e-12)
        assert int(row["params_total"]) == metrics["params_total"] > 0
        assert float(row["images_per_s"]) == pytest.approx(metrics["images_per_s"]) and metrics["images_per_s"] > 0
        assert float(row["acc_per_mparam"]) == pytest.approx(metrics["acc"] / (metrics["params_total"] / 1e6))
        assert float(row["val_acc"]) == pytest.approx(max(series["val/acc"]))
        assert int(row["params_trainable"]) == int(series["trainable_params"][-1])
        assert float(row["epoch_s"]) == pytest.approx(statistics.fmean(series["time/epoch_s"]))
        assert int(row["epochs"]) == len(series["time/epoch_s"]) == 2
        assert float(row["gap_train_val"]) == pytest.approx(series["gap/train_val_acc"][-1])


def assert_outputs(out: Path, runs: int) -> list[dict[str, str]]:
    rows = table(out)
    assert (out / "results.png").stat().st_size > 10_000
    md = (out / "results.md").read_text()
    assert all(r["run"] in md for r in rows) and "![results](results.png)" in md
    listed = [r for r in rows if r["run"] not in ("mean", "std")]
    assert len(listed) == runs
    assert_rows_match_runs(out, listed)
    return rows


def test_three_backbones_compared_and_an_interrupted_comparison_resumes(
    sweep_dir: Path, scripts: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    backbones = ["scratch/mlp", "scratch/simple_cnn", "timm/test_resnet"]
    args = ["--config", "base.yaml", "--out", "cmp", "--backbones", *backbones]
    script = [sys.executable, str(REPO / "scripts" / "compare_backbones.py"), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    listed = subprocess.run([*script, "--list"], env=env, capture_output=True, text=True, timeout=60)
    assert listed.stdout.splitlines() == ["0\tscratch-mlp", "1\tscratch-simple_cnn", "2\ttimm-test_resnet"]
    # the first run for real: the script as a job-array task, ftlab fit and test as its child processes
    first = subprocess.run([*script, "--index", "0"], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "Trainer.fit` stopped" in (sweep_dir / "cmp" / "runs" / "scratch-mlp" / "fit.log").read_text()
    finished = sweep_dir / "cmp" / "runs" / "scratch-mlp" / "version_0" / "metrics.json"
    stamp = finished.stat().st_mtime_ns

    compare: ModuleType = scripts("compare_backbones")
    monkeypatch.setenv("FTLAB_TEST_FAIL", "1")  # the second run's fit crashes at the start of epoch 1
    with pytest.raises(RuntimeError, match="injected crash"):
        compare.main([*args, "--only", "scratch-simple_cnn"], launcher=Recorder())
    monkeypatch.delenv("FTLAB_TEST_FAIL")
    crashed = sweep_dir / "cmp" / "runs" / "scratch-simple_cnn"
    assert (crashed / "version_0" / "checkpoints" / "last.ckpt").is_file() and not (crashed / "fit.done").exists()

    resumed = Recorder()
    assert compare.main(args, launcher=resumed) == 0
    assert resumed.runs("fit") == ["scratch-simple_cnn", "timm-test_resnet"]  # the finished run is not run again
    assert resumed.runs("test") == ["scratch-simple_cnn", "timm-test_resnet"]
    assert resumed.calls[0][-2:] == ["--ckpt_path", "last"]  # the crashed fit resumes from its last checkpoint
    assert finished.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in crashed.iterdir() if p.name.startswith("version")) == ["version_0"]
    rows = assert_outputs(sweep_dir / "cmp", runs=3)
    assert [r["backbone"] for r in rows] == backbones

    again = Recorder()
    assert compare.main(args, launcher=again) == 0 and again.calls == []  # all finished: nothing runs
    before = (sweep_dir / "cmp" / "results.csv").read_text()
    for name in ("results.csv", "results.md", "results.png"):
        (sweep_dir / "cmp" / name).unlink()
    assert compare.main([*args, "--collect-only"]) == 0  # rebuilt from the run folders alone
    assert (sweep_dir / "cmp" / "results.csv").read_text() == before and (sweep_dir / "cmp" / "results.png").is_file()


def test_grid_2x2_table_plot_and_best_yaml_that_runs(sweep_dir: Path, scripts: Any) -> None:
    grid = {
        "base": "base.yaml",
        "grid": {
            "model.optimizer.init_args.lr": [0.001, 0.01],
            "strategy": {
                "frozen": {"trainer": {"callbacks+": [{"class_path": "lightning_modules.Freeze"}]}},
                "full": {"trainer": {"callbacks+": [{"class_path": "lightning_modules.NoFreeze"}]}},
            },
        },
    }
    (sweep_dir / "grid.yaml").write_text(yaml.safe_dump(grid))
    assert scripts("grid_search").main(["grid.yaml", "--out", "grid"], launcher=in_process) == 0
    rows = assert_outputs(sweep_dir / "grid", runs=4)
    assert [(r["lr"], r["strategy"]) for r in rows] == [
        ("0.001", "frozen"),
        ("0.001", "full"),
        ("0.01", "frozen"),
        ("0.01", "full"),
    ]
    for row in rows:
        config = yaml.safe_load((sweep_dir / "grid" / "runs" / row["run"] / "version_0" / "config.yaml").read_text())
        assert config["model"]["optimizer"]["init_args"]["lr"] == float(row["lr"])
        frozen = int(row["params_trainable"]) < int(row["params_total"])
        assert frozen == (row["strategy"] == "frozen")

    best = max(rows, key=lambda r: float(r["val_acc"]))
    text = (sweep_dir / "grid" / "best.yaml").read_text()
    assert f"Best by val_acc: {best['run']}" in text and best["run"] in (sweep_dir / "grid" / "results.md").read_text()
    printed = sweep_dir / "printed.log"
    assert in_process(["fit", "--config", "grid/best.yaml", "--print_config"], printed) == 0
    resolved = yaml.safe_load(printed.read_text())
    assert resolved["model"]["optimizer"]["init_args"]["lr"] == float(best["lr"])
    strategy = "Freeze" if best["strategy"] == "frozen" else "NoFreeze"
    assert resolved["trainer"]["callbacks"][-1]["class_path"] == f"lightning_modules.{strategy}"
    assert resolved["trainer"]["logger"]["init_args"]["save_dir"] == "runs"  # not into the grid's run folders


def _assert_summary(rows: list[dict[str, str]], runs: int) -> None:
    listed, (mean, std) = rows[:runs], rows[runs:]
    assert (mean["run"], std["run"]) == ("mean", "std")
    for key in ("test_acc", "test_f1", "val_acc"):
        values = [float(r[key]) for r in listed]
        assert float(mean[key]) == pytest.approx(statistics.fmean(values))
        assert float(std[key]) == pytest.approx(statistics.stdev(values))


def test_three_fold_cross_validation_per_fold_and_mean_std(sweep_dir: Path, scripts: Any) -> None:
    out = sweep_dir / "kfold"
    assert scripts("kfold").main(["--config", "base.yaml", "--folds", "3", "--out", "kfold"], launcher=in_process) == 0
    rows = assert_outputs(out, runs=3)
    _assert_summary(rows, 3)
    assert [r["fold"] for r in rows[:3]] == ["0", "1", "2"]
    for i in range(3):
        config = yaml.safe_load((out / "runs" / f"fold{i}" / "version_0" / "config.yaml").read_text())
        assert (config["data"]["init_args"]["num_folds"], config["data"]["init_args"]["fold"]) == (3, i)
    assert "mean ± std" in (out / "results.md").read_text()


def test_two_seeds_mean_and_std(sweep_dir: Path, scripts: Any) -> None:
    out = sweep_dir / "seeds"
    args = ["--config", "base.yaml", "--seeds", "1", "2", "--out", "seeds", "--trainer.max_epochs", "2"]
    assert scripts("multi_seed").main(args, launcher=in_process) == 0
    rows = assert_outputs(out, runs=2)
    _assert_summary(rows, 2)
    for seed in (1, 2):
        config = yaml.safe_load((out / "runs" / f"seed{seed}" / "version_0" / "config.yaml").read_text())
        assert config["seed_everything"] == seed
    one, two = (
        torch.load(out / "runs" / f"seed{s}" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
        for s in (1, 2)
    )
    assert any(not torch.equal(w, two["state_dict"][k]) for k, w in one["state_dict"].items())  # two runs, not one


class FailingSeed2(Recorder):
    """As `Recorder`; seed2's fit crashes at epoch 1 and its `process` exits with status 1."""

    def __call__(self, args: list[str], log: Path) -> int:
        with pytest.MonkeyPatch.context() as mp:
            if args[0] == "fit" and any(a.endswith("seed2/run.yaml") for a in args):
                mp.setenv("FTLAB_TEST_FAIL", "1")
            try:
                return super().__call__(args, log)
            except RuntimeError as err:  # what an uncaught exception does to a process
                with log.open("a") as out:
                    print(f"RuntimeError: {err}", file=out)
                return 1


def test_a_seed_that_fails_is_reported_and_the_others_still_run(
    sweep_dir: Path, scripts: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    launcher = FailingSeed2()
    args = ["--config", "base.yaml", "--seeds", "1", "2", "3", "--out", "seeds"]
    assert scripts("multi_seed").main(args, launcher=launcher) == 1
    printed = capsys.readouterr().out
    assert "[seed2] ftlab fit failed with status 1; see " in printed and "injected crash" in printed
    assert "Not finished: seed2 (failed now: seed2)" in printed and "(2 of 3 runs finished)" in printed
    assert launcher.runs("fit") == ["seed1", "seed2", "seed3"] and launcher.runs("test") == ["seed1", "seed3"]
    rows = assert_outputs(sweep_dir / "seeds", runs=2)
    assert [r["run"] for r in rows[:2]] == ["seed1", "seed3"]  # the run after the failure is in the table
    _assert_summary(rows, 2)
