"""ftlab: every experiment YAML instantiates and runs; links, saved config, checkpoint shortcuts, clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml

from datamodules import DigitsDataModule
from lightning_modules.cli import main as cli
from lightning_modules.cli.main import cli_main
from tests.helpers import REPO
from tests.helpers.data import write_cifar, write_class_folders, write_mnist
from tests.helpers.runs import FAST, folder_args
from tests.helpers.tensorboard import events

EXPERIMENTS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "experiments").rglob("*.yaml"))
DATA = [e for e in EXPERIMENTS if e.startswith("experiments/data/")]
# a data config that also sets the model is a complete recipe (the own-images one): it runs on its own
RECIPE_DATA = [e for e in DATA if "model" in (yaml.safe_load((REPO / e).read_text()) or {})]
TRAINER = [e for e in EXPERIMENTS if e.startswith("experiments/trainer/")]
RUNNABLE = [e for e in EXPERIMENTS if not e.endswith("defaults.yaml") and e not in DATA + TRAINER]
DATASETS = ("cats_vs_dogs", "cifar10", "mnist", "pet_expressions")
TINY_MODEL = ["--model.backbone=timm/test_resnet", "--model.weights=none", "--model.image_size=32"]


class OwnSignature(DigitsDataModule):
    """A user's DataModule with a signature of its own, without `data_config`: it takes the model's at setup."""

    def __init__(self, batch_size: int = 16) -> None:
        super().__init__(batch_size=batch_size, num_workers=0)


def test_a_datamodule_without_a_data_config_argument_takes_the_models_at_setup(in_tmp: Path) -> None:
    no_workers = [arg for arg in FAST if "num_workers" not in arg]  # (its signature has none: it sets 0 itself)
    run = cli_main(["fit", *TINY_MODEL, f"--data={__name__}.OwnSignature", *no_workers])
    assert run.trainer.state.finished
    assert run.datamodule.data_config == run.model.backbone.data_config
    assert run.datamodule.data_config.input_size == (3, 32, 32)


def _tiny_data(name: str, root: Path) -> Path:
    """Small files in the real format of each dataset config."""
    if name == "cifar10":
        write_cifar(root)
    elif name == "mnist":
        write_mnist(root, gz=True)
    elif name == "cats_vs_dogs":
        write_class_folders(root / "PetImages", {"Cat": 5, "Dog": 5})
    elif name == "hf_dataset":  # a Hugging Face DatasetDict written by save_to_disk
        import datasets

        write_class_folders(root / "images", {"a": 5, "b": 5})
        datasets.load_dataset("imagefolder", data_dir=str(root / "images")).save_to_disk(str(root / "saved"))
        return root / "saved"
    elif name == "pet_expressions":
        seed = 0
        for split in ("train", "valid", "test"):
            seed = write_class_folders(
                root / "Master Folder" / split, dict.fromkeys(["Angry", "happy", "Sad", "Other"], 2), seed
            )
    else:
        write_class_folders(root, {"a": 5, "b": 5})
    return root


@pytest.mark.slow
@pytest.mark.parametrize("experiment", RUNNABLE)
def test_every_experiment_runs_fast_dev_run(in_tmp: Path, experiment: str) -> None:
    from lightning.pytorch.callbacks import EarlyStopping

    dataset = Path(experiment).parent.name
    args = ["fit", "--config", experiment, *FAST]
    if dataset in DATASETS:  # stand-ins: the real architecture without downloaded weights, tiny real-format data
        root = _tiny_data(dataset, in_tmp / "data")
        args += ["--model.weights=none", f"--data.init_args.root={root}", "--data.init_args.batch_size=4"]
        if "scratch/" not in Path(REPO / experiment).read_text():
            args.append("--model.image_size=32")
        if dataset != "cats_vs_dogs":
            args.append("--data.init_args.download=false")
    run = cli_main(args)
    assert run.trainer.state.finished
    assert run.model.hparams["num_classes"] == run.datamodule.num_classes
    assert run.model.class_names == run.datamodule.class_names
    assert run.datamodule.data_config == run.model.backbone.data_config
    assert any(isinstance(c, EarlyStopping) for c in run.trainer.callbacks)  # type: ignore[attr-defined]


@pytest.mark.parametrize("data_config", DATA)
def test_every_dataset_config_runs_on_its_real_format(in_tmp: Path, data_config: str) -> None:
    root = _tiny_data(Path(data_config).stem, in_tmp / "data")
    base = [] if data_config in RECIPE_DATA else ["--config", "experiments/quickstart.yaml"]
    args = [
        "fit",
        *base,
        "--config",
        data_config,
        *TINY_MODEL,
        *FAST,
        f"--data.init_args.{'path' if 'hf_' in data_config else 'root'}={root}",
        "--data.init_args.batch_size=4",
    ]
    run = cli_main(args)
    assert run.trainer.state.finished
    assert run.model.class_names == run.datamodule.class_names
    stem = Path(data_config).stem.replace("hf_dataset", "huggingface")
    assert type(run.datamodule).__name__.lower().startswith(stem.replace("_", "")[:5])


def _is_ddp_with_sync_batchnorm(run: Any) -> bool:
    from lightning.pytorch.strategies import DDPStrategy

    return (
        isinstance(run.trainer.strategy, DDPStrategy)
        and run.config.model.sync_batchnorm is True
        and run.config.trainer.sync_batchnorm is False
    )


def _averages_weights(run: Any) -> bool:
    from lightning.pytorch.callbacks import EMAWeightAveraging

    return any(isinstance(c, EMAWeightAveraging) for c in run.trainer.callbacks)


# what each trainer layer must set up (a new layer needs its entry: the test below fails without one)
TRAINER_CHECKS = {"ddp_gpus.yaml": _is_ddp_with_sync_batchnorm, "ema.yaml": _averages_weights}


@pytest.mark.parametrize("trainer_config", TRAINER)
def test_trainer_recipes_instantiate(in_tmp: Path, trainer_config: str) -> None:
    # on this CPU-only machine: the recipe's strategy and settings, on one CPU process
    args = [
        "--config",
        "experiments/quickstart.yaml",
        "--config",
        trainer_config,
        *TINY_MODEL,
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.precision=32",
    ]
    run = cli_main(args, run=False)
    assert TRAINER_CHECKS[Path(trainer_config).name](run)


def test_defaults_are_read_before_experiment_and_last_config_wins(in_tmp: Path) -> None:
    override = in_tmp / "override.yaml"
    override.write_text("trainer:\n  max_epochs: 2\nmodel:\n  image_size: 32\n")
    run = cli_main(["--config", "experiments/quickstart.yaml", "--config", str(override), *FAST], run=False)
    config = run.config
    assert config.trainer.max_epochs == 2
    assert config.seed_everything == 42  # from defaults.yaml
    names = [c.class_path.rsplit(".", 1)[-1] for c in config.trainer.callbacks]
    assert names == [
        "BestCheckpoint",
        "ModelCheckpoint",
        "TrainingStateLogger",
        "StopOnNonFiniteLoss",
        "ResumeNotice",
        "DropUntrainedRun",
        "Dashboard",
        "TestReport",
        "PredictionWriter",
        "FreezeUnfreeze",
    ]
    assert run.datamodule.data_config.input_size == (3, 32, 32)  # the model's preprocessing, given before building
    assert run.datamodule.hparams["data_config"]["input_size"] == [3, 32, 32]  # and recorded in hparams.yaml
    assert config.data.init_args.data_config is None  # config.yaml follows the model: a fit from it at 64 px takes 64
    # monitor from defaults.yaml, patience from the quickstart
    assert (config.early_stopping.monitor, config.early_stopping.patience) == ("val/acc", 20)
    assert (config.feature_cache.store, config.feature_cache.force) == ("memory", True)  # defaults, then quickstart


def test_an_optimizer_class_gets_its_own_defaults_not_adamws(in_tmp: Path) -> None:
    """A recipe naming Adam trains with Adam's weight_decay 0, not AdamW's 0.01 carried over as a coupled L2
    (it made the CIFAR-10 CNN underfit: train accuracy 0.59 after 50 epochs)."""
    data = [f"--data.init_args.root={_tiny_data('mnist', in_tmp / 'mnist')}"]
    run = cli_main(["--config", "experiments/mnist/mlp.yaml", *data, *FAST], run=False)
    optimizer = run.model.configure_optimizers()["optimizer"]
    assert type(optimizer) is torch.optim.Adam
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0}
    plain = cli_main(["--config", "experiments/mnist/mlp.yaml", "--model.optimizer=null", *data, *FAST], run=False)
    optimizer = plain.model.configure_optimizers()["optimizer"]
    assert type(optimizer) is torch.optim.AdamW and optimizer.param_groups[0]["weight_decay"] == 0.01


def _fit_quick(tmp: Path, epochs: int = 2) -> Path:
    args = [
        "fit",
        "--config",
        "experiments/quickstart.yaml",
        "--model.image_size=32",
        f"--trainer.max_epochs={epochs}",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--data.init_args.num_workers=0",
    ]
    cli_main(args)
    return tmp / "runs" / "quickstart" / "version_0"


@pytest.mark.slow
def test_fit_saves_config_and_test_best_reuses_the_run_directory(in_tmp: Path) -> None:
    run_dir = _fit_quick(in_tmp)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["backbone"] == "timm/tf_efficientnet_lite0"
    assert saved["model"]["image_size"] == 32
    assert saved["data"]["init_args"]["data_config"] is None  # follows the model when the file is used again
    hparams = yaml.safe_load((run_dir / "hparams.yaml").read_text())
    assert hparams["data_config"]["input_size"] == [3, 32, 32]  # the linked preprocessing is recorded
    assert hparams["class_names"] == [str(d) for d in range(10)]
    tensorboard = events(run_dir)  # the quickstart tests after fitting: two event files, in no fixed order
    scalars = tensorboard.Tags()["scalars"]
    assert {"lr/head", "lr/blocks.6", "lr/stem", "trainable_params", "val/acc", "train/loss_epoch"} <= set(scalars)
    counts = [e.value for e in tensorboard.Scalars("trainable_params")]
    assert len(counts) == 2 and counts[1] > counts[0]  # the head alone, then the unfrozen backbone too
    # unfrozen at epoch 1: the head's 3e-3 after one epoch of the quickstart's 20-epoch cosine, times 0.1
    head_lr = 0.003 * (1 + math.cos(math.pi / 20)) / 2
    assert [e.value for e in tensorboard.Scalars("lr/blocks.6")] == pytest.approx([head_lr * 0.1])
    best = list((run_dir / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1 and (run_dir / "checkpoints" / "last.ckpt").is_file()
    run = cli_main(
        [
            "test",
            "--config",
            "experiments/quickstart.yaml",
            "--model.image_size=32",
            "--ckpt_path",
            "best",
            "--trainer.limit_test_batches=2",
            "--trainer.enable_progress_bar=false",
            "--data.init_args.num_workers=0",
        ]
    )
    assert Path(str(run.trainer.log_dir)).resolve() == run_dir.resolve()
    assert (run_dir / "config_test.yaml").is_file()
    assert "test/acc" in run.trainer.callback_metrics
    assert not (in_tmp / "runs" / "quickstart" / "version_1").exists()


@pytest.mark.slow
def test_a_checkpoint_gives_its_architecture_but_not_its_learning_rate(in_tmp: Path) -> None:
    """`ftlab test --ckpt_path <file>` builds the model as trained (head_hidden here) and keeps the config's `lr`
    and `label_smoothing`; Lightning's own ckpt_path parsing would re-apply every saved hyperparameter."""
    digits = [*TINY_MODEL, "--data=datamodules.DigitsDataModule", "--data.init_args.num_workers=0"]
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    short = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1"]
    trained_as = ["--model.lr=0.5", "--model.label_smoothing=0.3", "--model.head_hidden=[16]"]
    fit = cli_main(["fit", *digits, *quiet, *short, *trained_as])
    ckpt = Path(str(fit.trainer.checkpoint_callback.best_model_path))  # type: ignore[union-attr]
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert (saved["lr"], saved["label_smoothing"], saved["head_hidden"]) == (0.5, 0.3, [16])
    run = cli_main(
        ["test", *digits, *quiet, "--model.lr=0.002", "--trainer.limit_test_batches=1", "--ckpt_path", str(ckpt)]
    )
    assert run.model.lr == 0.002 and run.model.hparams["lr"] == 0.002
    assert run.model.hparams["label_smoothing"] == 0.0
    assert run.model.hparams["head_hidden"] == [16]  # an ARCHITECTURE key: the checkpoint's
    tested = yaml.safe_load((Path(str(run.trainer.log_dir)) / "config_test.yaml").read_text())
    assert tested["ckpt_path"] == str(ckpt) and tested["model"]["lr"] == 0.002


@pytest.mark.slow
def test_with_a_csv_logger_alone_shortcuts_report_and_tables_work(in_tmp: Path) -> None:
    from lightning_modules.sweeps.summary import read_run, scalars

    quick = [
        "--config",
        "experiments/quickstart.yaml",
        "--model.image_size=32",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir=runs",
        "--trainer.logger.name=csvonly",
        "--trainer.enable_progress_bar=false",
        "--data.init_args.num_workers=0",
    ]
    short = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2"]
    cli_main(["fit", *quick, *short])
    run_dir = in_tmp / "runs" / "csvonly" / "version_0"
    assert not list(run_dir.glob("events.out.tfevents.*"))  # no TensorBoard anywhere
    assert len(scalars(run_dir)["val/acc"]) == 2 and len(scalars(run_dir)["trainable_params"]) == 2
    cli_main(["test", *quick, "--ckpt_path", "best", "--trainer.limit_test_batches=2"])
    assert (run_dir / "report.md").is_file() and (run_dir / "metrics.json").is_file()
    assert not (in_tmp / "runs" / "csvonly" / "version_1").exists()
    cli_main(["test", *quick, "--ckpt_path", "last", "--trainer.limit_test_batches=2"])
    assert not (in_tmp / "runs" / "csvonly" / "version_1").exists()
    row = read_run(in_tmp / "runs" / "csvonly")  # a sweep table's row, from the run folder alone
    assert row is not None and row["epochs"] == 2 and row["val_acc"] == max(scalars(run_dir)["val/acc"])


def test_beside_tensorboard_a_csv_logger_writes_into_the_same_run_directory(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from lightning_modules.reporting.run_logs import with_run_csv

    tb = TensorBoardLogger(tmp_path / "runs", name="x", version=3)
    tb_then_csv = with_run_csv(tb, None)
    assert [type(lg) for lg in tb_then_csv] == [TensorBoardLogger, CSVLogger]
    assert tb_then_csv[1].log_dir == tb.log_dir
    other = with_run_csv(object(), str(tmp_path), version="version_2")  # e.g. W&B: the CSV run folder comes first
    assert isinstance(other[0], CSVLogger) and Path(other[0].log_dir) == tmp_path / "lightning_logs" / "version_2"
    assert with_run_csv(False, None) is False


def test_ckpt_shortcut_without_runs_is_a_clear_error(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.argv", ["ftlab", "test", "--config", "experiments/quickstart.yaml", "--ckpt_path", "best"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no run under runs/quickstart yet (no version_* folder); train first with `ftlab fit`" in err
    assert "Traceback" not in err


def test_bad_backbone_is_one_line_error(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(
        "sys.argv",
        ["ftlab", "fit", "--config", "experiments/quickstart.yaml", "--model.backbone=timm/efficientnet_lite9", *FAST],
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ftlab: error: "), err  # one line, no traceback
    assert "timm has no model 'efficientnet_lite9'" in err[0] and "efficientnet_lite0" in err[0]


def test_two_stacked_strategies_are_one_line_error(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # the README once stacked quickstart.yaml under the own-images recipe: each brings a FreezeUnfreeze
    argv = ["ftlab", "fit", "--config", "experiments/quickstart.yaml", "--config", "experiments/data/image_folder.yaml"]
    monkeypatch.setattr("sys.argv", [*argv, *FAST])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "ftlab: error: trainer.callbacks holds 2 finetuning strategies (FreezeUnfreeze, FreezeUnfreeze): keep one. "
        "A recipe that sets its own (e.g. experiments/data/image_folder.yaml) runs on its own, not stacked on another"
    ]


@pytest.mark.slow
def test_lr_find_takes_all_its_steps_on_a_short_budget_and_applies_its_suggestion_with_a_strategy_in_place(
    in_tmp: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning.pytorch.tuner.lr_finder import _LRCallback  # the finder's only callback while it runs

    during: list[tuple[bool, list[str]]] = []  # per finder step: any backbone parameter trainable, the groups
    finder_step = _LRCallback.on_train_batch_start

    def probed(callback: Any, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        groups = [str(g.get("name")) for g in trainer.optimizers[0].param_groups]
        during.append((any(p.requires_grad for p in pl_module.backbone.parameters()), groups))
        finder_step(callback, trainer, pl_module, batch, batch_idx)

    monkeypatch.setattr(_LRCallback, "on_train_batch_start", probed)
    args = [
        "fit",
        "--config",
        "experiments/quickstart.yaml",
        *TINY_MODEL,
        "--lr_find=apply",
        "--trainer.max_epochs=2",  # a budget of 2 x 5 steps: the finder takes 100 (it once stopped at the budget)
        "--trainer.limit_train_batches=5",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=8",
    ]
    run = cli_main(args)
    out = capsys.readouterr().out
    assert "Learning-rate finder: 100 of 100 steps, lr 1e-08 to 1; suggests lr=" in out and "(applied)" in out, out
    suggested = float(out.split("suggests lr=")[1].split()[0])
    assert run.model.lr == pytest.approx(suggested, rel=1e-2)
    assert run.trainer.optimizers[0].param_groups[0]["name"] == "head"
    assert run.trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(suggested, rel=1e-2)  # its start
    # the finder trained the head alone, the backbone frozen at every one of its steps
    assert len(during) == 100 and all(step == (False, ["head"]) for step in during), during[:3]
    # the fit kept its own budget: the epoch limit the finder raised is back, and the fit ran its 2 x 5 steps
    assert run.trainer.max_epochs == 2 and run.trainer.current_epoch == 2 and run.trainer.global_step == 10
    # the figure: in the run folder, and in TensorBoard's IMAGES, read back by TensorBoard's own reader
    log_dir = Path(str(run.trainer.log_dir))
    assert (log_dir / "lr_find.png").is_file()
    tensorboard = events(log_dir)
    assert "lr_find" in tensorboard.Tags()["images"]  # beside the dashboard's pictures
    assert tensorboard.Images("lr_find")[0].encoded_image_string.startswith(b"\x89PNG")


def test_the_experiment_lists_are_found() -> None:
    # a parametrized test over an empty list passes silently: make sure every kind of config is present
    assert len(RUNNABLE) >= 11 and len(DATA) == 7 and TRAINER
    assert RECIPE_DATA == ["experiments/data/image_folder.yaml", "experiments/data/image_folder_accurate.yaml"]


def _numbers(report: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Every number of a metrics.json, flattened (`per_class.cat.f1` ...), the speed left out."""
    flat: dict[str, float] = {}
    for key, value in report.items():
        if isinstance(value, dict):
            flat |= _numbers(value, f"{prefix}{key}.")
        elif isinstance(value, list):
            flat |= {f"{prefix}{key}.{i}": float(v) for i, v in enumerate(np.ravel(value))}
        elif isinstance(value, int | float) and key not in ("images_per_s", "cam_seconds"):  # timings
            flat[f"{prefix}{key}"] = float(value)
    return flat


@pytest.mark.slow
def test_test_after_fit_writes_what_a_separate_test_of_the_best_checkpoint_writes(in_tmp: Path) -> None:
    write_class_folders(in_tmp / "imgs", {"cat": 10, "dog": 10, "owl": 10})
    args = [*folder_args(in_tmp / "imgs", batch_size=8), "--trainer.enable_model_summary=false"]
    cli_main(["fit", *args, "--trainer.max_epochs=2", "--test_after_fit=true"])
    run = in_tmp / "runs" / "image_folder" / "version_0"
    after_fit = {p.name for p in run.iterdir()}
    assert {"report.md", "metrics.json", "config_test.yaml", "pr_curves.png", "confusion_matrix.png"} <= after_fit
    cli_main(["test", *args, "--ckpt_path", "best"])  # the same checkpoint, in a process of its own
    first = json.loads((run / "metrics.json").read_text())
    second = json.loads((run / "metrics_2.json").read_text())
    assert first["checkpoint"] == second["checkpoint"] and "best-" in first["checkpoint"]
    expected = _numbers(second)
    assert _numbers(first).keys() == expected.keys()
    for key, value in _numbers(first).items():
        assert value == pytest.approx(expected[key], abs=1e-6), key
    written = {p.name.replace("_2.", ".") for p in run.iterdir() if "_2." in p.name}
    assert written == {n for n in after_fit if n.endswith((".png", ".json", ".md"))} - {
        "train_batch.png",
        "val_confusion_matrix.png",
        "val_misclassified.png",
        "learning_curves.png",
        "recipe.md",
        "progress.json",
    }  # the test's own files, numbered: the same set
