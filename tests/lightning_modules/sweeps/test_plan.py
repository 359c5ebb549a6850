"""lightning_modules/sweeps/plan.py without training: grids, overrides, config layers and clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from datamodules.common import ConfigError
from lightning_modules.sweeps.plan import Run, Sweep, grid_runs, load_grid, merge, overrides, run_one, select
from tests.helpers import REPO


def test_grid_is_the_cartesian_product_with_readable_names() -> None:
    runs = grid_runs(
        {
            "model.optimizer.init_args.lr": [0.001, 0.01],
            "data.init_args.batch_size": [32, 64],
            "strategy": {"frozen": {"trainer": {"callbacks+": [{"class_path": "F"}]}}},
        }
    )
    assert [r.name for r in runs] == [
        "lr=0.001_batch_size=32_strategy=frozen",
        "lr=0.001_batch_size=64_strategy=frozen",
        "lr=0.01_batch_size=32_strategy=frozen",
        "lr=0.01_batch_size=64_strategy=frozen",
    ]
    assert runs[1].params == {"lr": 0.001, "batch_size": 64, "strategy": "frozen"}
    assert runs[1].config == {
        "model": {"optimizer": {"init_args": {"lr": 0.001}}},
        "data": {"init_args": {"batch_size": 64}},
        "trainer": {"callbacks+": [{"class_path": "F"}]},
    }
    same_leaf = grid_runs({"model.head_dropout": [0.1], "trainer.callbacks.head_dropout": [0.2]})
    assert set(same_leaf[0].params) == {"model.head_dropout", "trainer.callbacks.head_dropout"}


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"modle.head_dropout": [0.1]}, "did you mean 'model'"),
        ({"model.head_dropout": []}, "non-empty list"),
        ({"model.head_dropout": 0.1}, "non-empty list"),
        ({"strategy": {"frozen": {"trainr": {}}}}, "did you mean 'trainer'"),
        ({}, "mapping of config keys"),
        ({"strategy": {"frozen": 1}}, "must map to a YAML layer"),
    ],
)
def test_bad_grids_are_clear_errors(grid: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        grid_runs(grid)


def test_grid_file_needs_base_and_grid(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"grid": {"model.head_dropout": [0.1]}}))
    with pytest.raises(ConfigError, match="needs `base"):
        load_grid(path)
    path.write_text(yaml.safe_dump({"base": "x.yaml", "grid": {"model.head_dropout": [0.1]}, "metrik": "val_acc"}))
    with pytest.raises(ConfigError, match="unknown keys"):
        load_grid(path)


@pytest.mark.slow
def test_missing_base_config_and_bad_metric_exit_2_with_one_line(tmp_path: Path) -> None:
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"base": "missing.yaml", "grid": {"model.head_dropout": [0.1]}}))
    script = [sys.executable, str(REPO / "scripts" / "grid_search.py")]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([*script, str(grid)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert result.returncode == 2 and result.stderr == "error: experiment config missing.yaml does not exist\n"
    grid.write_text(yaml.safe_dump({"base": "missing.yaml", "grid": {"model.head_dropout": [0.1]}, "metric": "x"}))
    result = subprocess.run([*script, str(grid)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert result.returncode == 2 and "grid metric 'x' is not one of test_acc" in result.stderr


def test_overrides_become_one_yaml_layer() -> None:
    layer = overrides(["--trainer.max_epochs", "2", "--model.head_hidden=[64]", "--model.backbone", "timm/x"])
    assert layer == {"trainer": {"max_epochs": 2}, "model": {"head_hidden": [64], "backbone": "timm/x"}}
    with pytest.raises(ConfigError, match="needs a value"):
        overrides(["--trainer.max_epochs"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        overrides(["stray"])


def test_merge_appends_plus_lists_and_overrides_the_rest() -> None:
    base = {"trainer": {"callbacks+": [1], "max_epochs": 5}, "model": {"lr": 1}}
    assert merge(base, {"trainer": {"callbacks+": [2], "max_epochs": 2}}) == {
        "trainer": {"callbacks+": [1, 2], "max_epochs": 2},
        "model": {"lr": 1},
    }


def test_select_by_index_or_name(tmp_path: Path) -> None:
    sweep = Sweep(tmp_path, [], [Run("a", {}), Run("b", {})])
    assert [r.name for r in select(sweep, None, 1)] == ["b"]
    assert [r.name for r in select(sweep, "a", None)] == ["a"]
    with pytest.raises(ConfigError, match="has 2 runs \\(0 to 1\\)"):
        select(sweep, None, 2)
    with pytest.raises(ConfigError, match="did you mean 'a'"):
        select(sweep, "aa", None)


def test_a_run_folder_with_another_config_is_not_reused(tmp_path: Path) -> None:
    run = Run("r", {"lr": 1}, {"model": {"lr": 1}})
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "run.yaml").write_text("model: {lr: 2}\n")
    with pytest.raises(ConfigError, match="was run with another config"):
        run_one(Sweep(tmp_path, [], [run]), run, launcher=lambda args, log: 0)


def test_the_example_grid_reads() -> None:
    base, runs, metric = load_grid(REPO / "scripts" / "grids" / "mnist_mlp.yaml")
    assert base == ["experiments/mnist/mlp.yaml"] and metric == "val_acc" and len(runs) == 16
    assert runs[0].name == "batch_size=64_lr=0.001_weight_decay=0.0_head_hidden=none"
    assert runs[-1].name.endswith("head_hidden=64") and runs[-1].config["model"]["head_hidden"] == [64]


def test_scalars_come_from_metrics_csv_and_older_fits_from_their_events(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from lightning_modules.sweeps.summary import scalars

    writer = SummaryWriter(str(tmp_path))  # a fit from before ftlab kept metrics.csv
    for step, value in ((10, 0.5), (20, 0.7)):
        writer.add_scalar("val/acc", value, step)
    writer.close()
    (tmp_path / "metrics.csv").write_text("epoch,step,test/acc\n1,20,0.9\n")  # a later ftlab test
    assert scalars(tmp_path) == {"val/acc": [0.5, pytest.approx(0.7)], "test/acc": [0.9]}
    # a run with its fit in metrics.csv: the CSV alone, a step logged twice (a resume) keeps its last value
    (tmp_path / "metrics.csv").write_text("epoch,step,val/acc,test/acc\n0,10,0.6,\n1,20,0.65,\n1,20,0.8,\n1,20,,0.9\n")
    assert scalars(tmp_path) == {"val/acc": [0.6, 0.8], "test/acc": [0.9]}


@pytest.mark.parametrize(("status", "name"), [(143, "SIGTERM"), (130, "SIGINT"), (-15, "SIGTERM")])
def test_an_interrupted_member_is_never_done_and_its_fit_resumes_from_last_ckpt_on_the_next_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], status: int, name: str
) -> None:
    run = Run("a", {"lr": 0.1})
    sweep = Sweep(tmp_path, [], [run])
    calls: list[list[str]] = []

    def stopped(args: list[str], log: Path) -> int:  # the fit wrote a checkpoint, then a signal ended it
        calls.append(args)
        (sweep.root(run) / "version_0" / "checkpoints").mkdir(parents=True)
        (sweep.root(run) / "version_0" / "checkpoints" / "last.ckpt").touch()
        return status  # -15: killed by SIGTERM before ftlab could answer (while importing torch)

    assert run_one(sweep, run, stopped) is False
    assert f"[a] ftlab fit interrupted by {name}; the next run of this sweep resumes its fit from last.ckpt" in (
        capsys.readouterr().out
    )
    assert [c[0] for c in calls] == ["fit"] and not (sweep.root(run) / "fit.done").exists()  # not done, not tested

    def finishing(args: list[str], log: Path) -> int:
        calls.append(args)
        if args[0] == "test":
            (sweep.root(run) / "version_0" / "metrics.json").write_text("{}")
        return 0

    assert run_one(sweep, run, finishing) is True
    assert [c[0] for c in calls] == ["fit", "fit", "test"] and calls[1][-2:] == ["--ckpt_path", "last"]
