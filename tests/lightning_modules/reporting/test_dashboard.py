"""The dashboard as TensorBoard shows it (its own event reader and HParams routes) and as the run folder keeps it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from lightning_modules.backbones.backbone import build_backbone
from lightning_modules.cli.main import cli_main
from lightning_modules.finetuning.strategies import Freeze, FreezeUnfreeze, Milestones, NoFreeze
from lightning_modules.reporting.dashboard import METRICS
from tests.helpers.data import write_class_folders
from tests.helpers.runs import folder_args, in_process
from tests.helpers.tensorboard import events, hparams_api, sessions_by, text

PICTURES = ("train_batch", "val_confusion_matrix", "val_misclassified", "learning_curves")


@pytest.mark.slow
def test_a_fit_and_its_test_fill_every_tab_and_the_run_folder(in_tmp: Path) -> None:
    write_class_folders(in_tmp / "imgs", {"cat": 12, "dog": 12, "owl": 12})
    common = [*folder_args(in_tmp / "imgs", batch_size=8), "--trainer.enable_model_summary=false"]
    cli_main(["fit", *common, "--trainer.max_epochs=4"])  # the recipe unfreezes the backbone at epoch 3
    run = in_tmp / "runs" / "image_folder" / "version_0"
    for name in PICTURES:  # the fit's pictures, in the run folder before any test
        with Image.open(run / f"{name}.png") as image:
            image.verify()
    fit = events(run)
    assert {"train/batch", "val/confusion_matrix", "val/misclassified", "curves/learning"} <= set(fit.Tags()["images"])
    steps = [e.step for e in fit.Images("val/confusion_matrix")]
    assert len(steps) == len(set(steps)) == len(fit.Scalars("val/acc")) == 4  # every epoch, each at its own step
    assert len(fit.Images("train/batch")) == 1  # once per fit
    assert "hp_metric" not in fit.Tags()["scalars"]  # Lightning's placeholder (-1) is off
    recipe = text(fit, "run/recipe")
    assert "FreezeUnfreeze: epochs 0-2: head only; from epoch 3: + all" in recipe
    assert "Data: 3 classes (cat, dog, owl)" in recipe and "lr 0.001" in recipe
    assert (run / "recipe.md").read_text().strip() == recipe
    trainable = [e.value for e in fit.Scalars("trainable_params")]
    assert trainable[3] > trainable[2]  # what the learning curves mark

    cli_main(["test", *common, "--ckpt_path", "best"])
    report = json.loads((run / "metrics.json").read_text())
    tested = events(run)
    assert {f"test/pr/{name}" for name in ("cat", "dog", "owl")} <= set(tested.Tags()["tensors"])
    assert "test/pr_curves" in tested.Tags()["images"] and (run / "pr_curves.png").is_file()
    markdown = (run / "report.md").read_text()
    assert "![learning curves](learning_curves.png)" in markdown and "(pr_curves.png)" in markdown

    experiment = hparams_api(in_tmp / "runs", "experiment", {"experimentName": ""})
    assert [m["name"]["tag"] for m in experiment["metricInfos"]] == list(METRICS)
    (session,) = sessions_by(in_tmp / "runs", "hp/best_val_acc")
    assert session["hparams"]["backbone"] == "timm/test_resnet" and session["hparams"]["unfreeze_epochs"] == "3"
    assert session["hparams"]["strategy"] == "FreezeUnfreeze" and session["hparams"]["lr"] == pytest.approx(1e-3)
    assert not any(key.startswith("_") or "root" in key for key in session["hparams"])  # no noise keys, no paths
    values = session["metrics"]
    val_acc = [e.value for e in fit.Scalars("val/acc")]
    assert values["hp/best_val_acc"] == pytest.approx(max(val_acc)) and values["hp/epochs"] == 4
    assert val_acc[int(values["hp/best_epoch"])] == pytest.approx(max(val_acc))
    assert values["test/acc"] == pytest.approx(report["acc"], abs=1e-6)  # not -1: the test's own number
    assert session["status"] == "STATUS_SUCCESS"


@pytest.mark.slow
def test_a_three_member_sweep_sorts_by_val_accuracy_in_the_hparams_table(in_tmp: Path) -> None:
    base = {
        "trainer": {"max_epochs": 2, "limit_train_batches": 3, "enable_progress_bar": False},
        "model": {"backbone": "scratch/mlp", "weights": "none", "image_size": 16, "optimizer": "torch.optim.SGD"},
        "data": {"class_path": "datamodules.DigitsDataModule", "init_args": {"batch_size": 32, "num_workers": 0}},
    }
    (in_tmp / "base.yaml").write_text(yaml.safe_dump(base))
    grid = {"base": "base.yaml", "grid": {"model.optimizer.init_args.lr": [0.0001, 0.01, 0.3]}}
    (in_tmp / "grid.yaml").write_text(yaml.safe_dump(grid))
    import importlib
    import sys

    from tests.helpers import REPO

    sys.path.insert(0, str(REPO / "scripts"))
    try:
        assert importlib.import_module("grid_search").main(["grid.yaml", "--out", "grid"], launcher=in_process) == 0
    finally:
        sys.path.remove(str(REPO / "scripts"))
    rows = sessions_by(in_tmp / "grid" / "runs", "hp/best_val_acc")
    assert len(rows) == 3
    assert sorted(row["hparams"]["lr"] for row in rows) == pytest.approx([0.0001, 0.01, 0.3])
    accuracies = [row["metrics"]["hp/best_val_acc"] for row in rows]
    assert accuracies == sorted(accuracies, reverse=True) and len(set(accuracies)) > 1  # ordered, and they differ
    for row in rows:  # each value is the run's own best val/acc
        series = events(in_tmp / "grid" / "runs" / row["name"]).Scalars("val/acc")
        assert row["metrics"]["hp/best_val_acc"] == pytest.approx(max(e.value for e in series))
        assert 0 <= row["metrics"]["test/acc"] <= 1


def test_each_strategy_says_what_trains_when() -> None:
    backbone = build_backbone("timm/test_resnet", "none", 32)
    names = [s.name for s in backbone.stages]
    total = len(names)
    assert Freeze().describe(backbone, 5) == "Freeze: head only (backbone frozen)"
    assert NoFreeze().describe(backbone, 5).startswith(f"NoFreeze: from epoch 0: + all {total} stages")
    unfreeze = FreezeUnfreeze(unfreeze_at_epoch=1, stages=2, lr_factor=0.1, lr_decay=0.5)
    assert unfreeze.describe(backbone, 5) == (
        f"FreezeUnfreeze: epoch 0: head only; from epoch 1: + 2 of {total} stages ({names[-1]}, {names[-2]}) at "
        "the head's rate x 0.1, x 0.5 per stage down"
    )
    milestones = Milestones([(2, 1), (4, -1)], lr=1e-4)
    assert milestones.schedule(backbone, 10) == [(2, names[-1:]), (4, names[-2::-1])]
    assert "epochs 0-1: head only; from epoch 2: + 1 of" in milestones.describe(backbone, 10)
    assert milestones.schedule(backbone, 3) == [(2, names[-1:])]  # within the epochs the run has
