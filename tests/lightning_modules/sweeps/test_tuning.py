"""scripts/tune.py: an Optuna study of tiny trials on digits; pruning by the callback, a kill and a resume, and
best.yaml as a ready experiment."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from datamodules.common import ConfigError
from lightning_modules.sweeps.tuning import load_search, open_study, parse_space
from tests.helpers import REPO
from tests.helpers.runs import in_process

optuna = pytest.importorskip("optuna", reason="the sweep extra (pip install -e '.[sweep]') is not installed")

BASE = """
trainer:
  max_epochs: 3
  limit_train_batches: 4
  limit_val_batches: 2
  limit_test_batches: 1
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
model: {backbone: scratch/mlp, weights: none, image_size: 8, in_chans: 1, optimizer: {class_path: torch.optim.AdamW}}
data:
  class_path: datamodules.DigitsDataModule
  init_args: {batch_size: 32, num_workers: 0}
"""
SEARCH = """
base: base.yaml
metric: val_acc
trials: 6
seed: 3
pruner: {startup_trials: 2, warmup_epochs: 0}
space:
  model.optimizer.init_args.lr: [1.0e-7, 1.0e-2]   # a hopeless rate and a good one: the pruner has work
  model.head_dropout: {low: 0.0, high: 0.3}
"""


def _tune_args(*extra: str) -> list[str]:
    return ["search.yaml", "--out", "study", *extra]


def _study() -> object:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name="search", storage=JournalStorage(JournalFileBackend("study/study.journal")))


def _states(study: object) -> list[str]:
    return [t.state.name for t in study.get_trials(deepcopy=False)]  # type: ignore[attr-defined]


def test_the_space_is_checked_with_the_key_named() -> None:
    with pytest.raises(ConfigError, match=r"'model.lr': low and high must be numbers with low < high"):
        parse_space({"model.lr": {"low": 1, "high": 0.1}}, "f.yaml")
    with pytest.raises(ConfigError, match=r"'modle.lr' is not an ftlab config key.*did you mean 'model'"):
        parse_space({"modle.lr": [1, 2]}, "f.yaml")
    with pytest.raises(ConfigError, match=r"space key 'strategy' .no dots. must map labels to YAML layers"):
        parse_space({"strategy": [1, 2]}, "f.yaml")
    kinds = {
        p.name: p.kind for p in parse_space({"model.x": {"low": 1, "high": 8}, "model.y": {"low": 0.0, "high": 1}}, "")
    }
    assert kinds == {"model.x": "int", "model.y": "float"}


@pytest.mark.slow
def test_a_study_prunes_survives_a_kill_and_ends_with_a_ready_best_yaml(in_tmp: Path) -> None:
    (in_tmp / "base.yaml").write_text(BASE)
    (in_tmp / "search.yaml").write_text(SEARCH)
    code = f"import sys; sys.path.insert(0, {str(REPO / 'scripts')!r}); import tune; "
    code += "from tests.helpers.runs import in_process; "
    code += f"sys.exit(tune.main({_tune_args()!r}, launcher=in_process))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", code], cwd=in_tmp, env=env, start_new_session=True)
    deadline = time.time() + 400
    while True:  # kill the study's process (and its trial) once three trials are finished
        assert child.poll() is None, "the study ended before it was killed"
        assert time.time() < deadline
        if (in_tmp / "study" / "study.journal").is_file():
            states = _states(_study())
            if sum(s in ("COMPLETE", "PRUNED") for s in states) >= 3:
                break
        time.sleep(0.5)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    before = _study().get_trials(deepcopy=False)  # type: ignore[attr-defined]
    done_before = {t.user_attrs["run"] for t in before if t.state.name in ("COMPLETE", "PRUNED")}
    logs = {run: (in_tmp / "study" / "runs" / run / "fit.log").read_bytes() for run in done_before}

    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import tune

        assert tune.main(_tune_args(), launcher=in_process) == 0
    finally:
        sys.path.remove(str(REPO / "scripts"))

    trials = _study().get_trials(deepcopy=False)  # type: ignore[attr-defined]
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 6
    assert any(t.state.name == "PRUNED" for t in finished)  # the callback's report, the median pruner's call
    runs = [t.user_attrs["run"] for t in finished]
    assert len(set(runs)) == len(runs)  # no finished trial was run twice ...
    for run, log in logs.items():  # ... nor trained again: its fit log is as the killed study left it
        assert (in_tmp / "study" / "runs" / run / "fit.log").read_bytes() == log
    for t in trials:
        if t.state.name == "FAIL":  # the trial the kill cut short: asked again with its values
            assert any(r.user_attrs.get("retry_of") == t.number and r.params == t.params for r in finished)

    with (in_tmp / "study" / "results.csv").open() as f:
        table = {row["run"]: row for row in csv.DictReader(f)}
    assert sorted(table) == sorted(runs)
    assert {row["state"] for row in table.values()} == {"complete", "pruned"}
    best_trial = max((t for t in finished if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert float(table[best_trial.user_attrs["run"]]["val_acc"]) == pytest.approx(best_trial.value)

    best = in_tmp / "study" / "best.yaml"
    printed = subprocess.run(
        [sys.executable, "-m", "lightning_modules.cli.main", "fit", "--config", str(best), "--print_config"],
        cwd=in_tmp,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    config = yaml.safe_load(printed)
    assert config["model"]["optimizer"]["init_args"]["lr"] == best_trial.params["model.optimizer.init_args.lr"]
    assert config["model"]["head_dropout"] == pytest.approx(best_trial.params["model.head_dropout"])
    assert "PruneTrial" not in best.read_text()  # the study's callback stays out of the experiment


def test_the_search_file_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("base: b.yaml\nspace: {model.head_dropout: [0, 0.5]}\nmetric: test_acc\n")
    with pytest.raises(ConfigError, match="maximises val_acc"):
        load_search(path)
    path.write_text("base: b.yaml\nspace: {model.head_dropout: [0, 0.5]}\ntrails: 5\n")
    with pytest.raises(ConfigError, match=r"unknown keys \['trails'\]"):
        load_search(path)


def test_workers_on_one_study_sample_different_values(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text("base: b.yaml\nseed: 0\nspace: {model.head_dropout: {low: 0.0, high: 0.5}}\n")
    search = load_search(tmp_path / "s.yaml")
    first, second = (open_study(tmp_path / "study", search, worker).ask() for worker in (0, 1))
    assert first.number != second.number
    values = [t.suggest_float("model.head_dropout", 0.0, 0.5) for t in (first, second)]
    assert values[0] != values[1]  # one seed for both would give both workers the same first trial
