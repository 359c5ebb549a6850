"""Where sweep members run: `--jobs N` on this machine (slots of GPUs or CPU cores) and `--launcher submitit`
(submitit's local executor runs the same code path as SLURM jobs, on this machine)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_modules.sweeps import launchers
from lightning_modules.sweeps.interrupts import INTERRUPTS
from lightning_modules.sweeps.launchers import LocalLauncher, Member, run_members, slots
from lightning_modules.sweeps.plan import Run, Sweep
from tests.helpers import REPO

TINY = """
trainer:
  max_epochs: 1
  limit_train_batches: 2
  limit_val_batches: 1
  limit_test_batches: 1
  enable_progress_bar: false
  enable_model_summary: false
  callbacks+:
    - class_path: tests.lightning_modules.sweeps.test_launchers.Stamp
model: {backbone: scratch/mlp, weights: none, image_size: 8, in_chans: 1}
data:
  class_path: datamodules.DigitsDataModule
  init_args: {batch_size: 32, num_workers: 0}
"""
MEMBERS = ["scratch/mlp@none", "scratch/simple_cnn@none"]


class Stamp(pl.Callback):
    """Writes, beside the run, when its fit started and ended and what the process was given (cores, threads)."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.time()
        time.sleep(2)  # long enough that two members running at once overlap

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stamp = {
            "start": self.start,
            "end": time.time(),
            "cpus": sorted(os.sched_getaffinity(0)),
            "threads": torch.get_num_threads(),
            "omp": os.environ.get("OMP_NUM_THREADS"),
        }
        Path(trainer.log_dir or ".", "stamp.json").write_text(json.dumps(stamp))


class Pretend(LocalLauncher):
    """Runs nothing, in this process: `ftlab fit` of run `m1` fails, every `ftlab test` leaves the run's
    `metrics.json` as a real one does."""

    def __call__(self, args: list[str], log: Path) -> int:
        if args[0] == "fit":
            return int(log.parent.name == "m1")
        (log.parent / "version_0").mkdir(parents=True)
        (log.parent / "version_0" / "metrics.json").write_text("{}")
        return 0


def scripts_module(name: str) -> ModuleType:
    """A script of scripts/ as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table(out: Path) -> dict[str, dict[str, Any]]:
    with (out / "results.csv").open() as f:
        return {row["run"]: row for row in csv.DictReader(f)}


def _check_rows_match_runs(out: Path) -> None:
    table = _table(out)
    assert sorted(table) == ["scratch-mlp-none", "scratch-simple_cnn-none"]
    for name, row in table.items():
        metrics = json.loads((out / "runs" / name / "version_0" / "metrics.json").read_text())
        assert float(row["test_acc"]) == pytest.approx(metrics["acc"])
        assert (
            row["backbone"]
            == {"scratch-mlp-none": "scratch/mlp", "scratch-simple_cnn-none": "scratch/simple_cnn"}[name]
        )


def test_slots_deal_gpus_round_robin_and_split_the_cores() -> None:
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots(2, 2, gpus=4)] == ["0,1", "2,3"]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots(3, 1, gpus=2)] == ["0", "1", "0"]
    cpu = slots(2, gpus=0, cpus=[0, 1, 2, 3, 4])
    assert [sorted(s.cpus or []) for s in cpu] == [[0, 1], [2, 3, 4]]
    assert [s.env["OMP_NUM_THREADS"] for s in cpu] == ["2", "3"]
    assert [sorted(s.cpus or []) for s in slots(3, gpus=0, cpus=[0, 1])] == [[0], [1], [0]]  # more jobs than cores


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_sweep_counts_its_members_done_below_their_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], jobs: int
) -> None:
    (tmp_path / "base.yaml").write_text("trainer: {max_epochs: 1}\n")
    runs = [Run(f"m{i}", {}) for i in range(3)]
    sweep = Sweep(tmp_path / "out", [str(tmp_path / "base.yaml")], runs)
    assert run_members(sweep, runs, Pretend(), jobs=jobs) == ["m1"]
    printed = capsys.readouterr()
    said = [line.split(";")[0] for line in printed.out.splitlines()]  # whole lines, none broken by the bar
    assert sorted(said) == [
        "[m0] ftlab fit",
        "[m0] ftlab test",
        "[m1] ftlab fit",
        "[m1] ftlab fit failed with status 1",
        "[m2] ftlab fit",
        "[m2] ftlab test",
    ]
    closed = printed.err.replace("\r", "\n").splitlines()[-1]  # the progress line as it closed
    assert closed.startswith("sweep: 100%") and "3/3 [" in closed, closed
    assert closed.endswith(("member/s, 1 failed]", "s/member, 1 failed]")), closed  # the rate, the failures

    quiet = Sweep(tmp_path / "quiet", sweep.base, runs, common={"trainer": {"enable_progress_bar": False}})
    assert run_members(quiet, runs, Pretend(), jobs=jobs) == ["m1"]
    assert "sweep:" not in capsys.readouterr().err  # off with the runs' progress bar


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two slots need two cores")
def test_two_members_run_at_once_each_on_its_own_cores(in_tmp: Path) -> None:
    (in_tmp / "base.yaml").write_text(TINY)
    compare = scripts_module("compare_backbones")
    args = ["--config", "base.yaml", "--out", "cmp", "--backbones", *MEMBERS, "--jobs", "2"]
    assert compare.main(args) == 0
    _check_rows_match_runs(in_tmp / "cmp")
    stamps = [json.loads(p.read_text()) for p in sorted((in_tmp / "cmp" / "runs").glob("*/version_0/stamp.json"))]
    assert len(stamps) == 2
    first, second = sorted(stamps, key=lambda s: s["start"])
    assert second["start"] < first["end"]  # they overlapped
    assert not set(first["cpus"]) & set(second["cpus"])  # each on its own cores
    assert all(s["omp"] == str(len(s["cpus"])) and s["threads"] == len(s["cpus"]) for s in stamps)


@pytest.mark.slow
def test_members_run_as_submitit_jobs_and_are_collected(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    submitit = pytest.importorskip("submitit", reason="the sweep extra (pip install -e '.[sweep]') is not installed")
    monkeypatch.setattr(submitit.AutoExecutor, "which", staticmethod(lambda: "local"))  # local even beside SLURM
    (in_tmp / "base.yaml").write_text(TINY)
    compare = scripts_module("compare_backbones")
    args = ["--config", "base.yaml", "--out", "cmp", "--backbones", *MEMBERS, "--launcher", "submitit"]
    assert compare.main([*args, "--no-wait"]) == 0  # submitted, not waited for
    jobs = json.loads((in_tmp / "cmp" / "submitit" / "jobs.json").read_text())
    assert sorted(jobs) == ["scratch-mlp-none", "scratch-simple_cnn-none"]
    deadline = time.time() + 300
    while not all((in_tmp / "cmp" / "runs" / n / "version_0" / "metrics.json").is_file() for n in jobs):
        assert time.time() < deadline, list((in_tmp / "cmp" / "submitit").glob("*"))
        time.sleep(2)
    assert compare.main(args) == 0  # the same command: nothing to submit, the table
    assert json.loads((in_tmp / "cmp" / "submitit" / "jobs.json").read_text()) == jobs  # nothing resubmitted
    _check_rows_match_runs(in_tmp / "cmp")


# stands for `ftlab fit`: says it runs, and ends with status 143 on SIGTERM, as ftlab does
MEMBER = "import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(143)); "
MEMBER += "pathlib.Path(sys.argv[1]).touch(); time.sleep(60)"


def test_a_signal_to_the_sweep_stops_its_running_member_and_starts_no_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.yaml").write_text(TINY)
    started: list[str] = []

    def member(args: list[str], log: Path) -> int:  # a child process, started as the sweep starts ftlab
        started.append(log.parent.name)
        return INTERRUPTS.run([sys.executable, "-c", MEMBER, str(log.with_suffix(".running"))])

    def ctrl_c() -> None:  # once the first member runs: SIGINT to the sweep's process alone
        running = tmp_path / "seeds" / "runs" / "seed1" / "fit.running"
        deadline = time.monotonic() + 60
        while not running.is_file() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    sender = threading.Thread(target=ctrl_c)
    sender.start()
    status = scripts_module("multi_seed").main(["--config", "base.yaml", "--seeds", "1", "2", "--out", "seeds"], member)
    sender.join()
    out = capsys.readouterr().out
    assert status == 130  # 128 + SIGINT: the sweep was interrupted, not finished
    assert started == ["seed1"]  # the member running got the signal (as SIGTERM: it exited 143); none started after
    assert "[seed1] ftlab fit interrupted by SIGTERM; the next run of this sweep starts its fit again" in out
    assert "Interrupted by SIGINT; not finished: seed1, seed2. The same command resumes the sweep" in out
    assert not (tmp_path / "seeds" / "runs" / "seed1" / "fit.done").exists()


def test_a_requeued_submitit_member_resumes_its_fit_from_last_ckpt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("submitit", reason="the sweep extra (pip install -e '.[sweep]') is not installed")
    run = Run("a", {})
    sweep = Sweep(tmp_path, [], [run])
    (sweep.root(run) / "version_0" / "checkpoints").mkdir(parents=True)
    (sweep.root(run) / "version_0" / "checkpoints" / "last.ckpt").touch()  # what the preempted job's fit left
    calls: list[list[str]] = []

    class Recording(LocalLauncher):
        def __call__(self, args: list[str], log: Path) -> int:
            calls.append(args)
            if args[0] == "test":
                (sweep.root(run) / "version_0" / "metrics.json").write_text("{}")
            return 0

    monkeypatch.setattr(launchers, "LocalLauncher", Recording)
    requeued = Member().checkpoint(sweep, run)  # what submitit pickles and runs again after the requeue
    assert requeued.function(*requeued.args, **requeued.kwargs) is True
    config = ["--config", str(sweep.root(run) / "run.yaml")]
    assert calls == [["fit", *config, "--ckpt_path", "last"], ["test", *config, "--ckpt_path", "best"]]
