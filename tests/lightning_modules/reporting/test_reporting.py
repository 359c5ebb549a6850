"""The test report against metrics computed independently with sklearn; figures and hparams in TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
    roc_auc_score,
)

from datamodules.images import load_image
from lightning_modules.cli.main import cli_main
from lightning_modules.module import PresentClassesAUROC
from tests.helpers.data import write_class_folders
from tests.helpers.runs import folder_args

FIGURES = ("confusion_matrix", "correct", "misclassified", "top_losses", "first_layer_kernels", "feature_maps", "cam")


def _fit_and_test(tmp: Path, classes: dict[str, int]) -> tuple[Path, np.ndarray, np.ndarray]:
    write_class_folders(tmp / "imgs", classes)
    common = [
        *folder_args(tmp / "imgs", batch_size=8),
        "--data.init_args.test_fraction=0.4",
        "--trainer.enable_model_summary=false",
    ]
    cli_main(["fit", *common, "--trainer.max_epochs=2"])
    run = cli_main(["test", *common, "--ckpt_path", "best"])
    # the same predictions, independently: the model on the test loader
    model, dm = run.model.eval(), run.datamodule
    probs, targets = [], []
    with torch.no_grad():
        for batch in dm.test_dataloader():
            probs.append(model(batch.inputs).softmax(1))
            targets.append(batch.targets)
    return Path(str(run.trainer.log_dir)), torch.cat(probs).numpy(), torch.cat(targets).numpy()


def assert_per_class_follows_sklearn(report: dict, probs: np.ndarray, targets: np.ndarray) -> None:
    """The whole confusion matrix (rows: true class, columns: predicted) and each class's precision, recall, F1
    and support equal sklearn's on the same predictions."""
    labels = list(range(probs.shape[1]))
    preds = probs.argmax(1)
    expected = confusion_matrix(targets, preds, labels=labels)
    assert np.array_equal(np.array(report["confusion_matrix"]), expected), (report["confusion_matrix"], expected)
    columns = precision_recall_fscore_support(targets, preds, labels=labels, average=None, zero_division=0)
    for i, figures in enumerate(report["per_class"].values()):
        for key, column in zip(("precision", "recall", "f1", "support"), columns, strict=True):
            assert figures[key] == pytest.approx(column[i], abs=1e-6), (i, key)  # float32 tensors


@pytest.mark.slow
@pytest.mark.parametrize("classes", [{"cat": 10, "dog": 10}, {"a": 8, "b": 8, "c": 8}])
def test_report_matches_sklearn(in_tmp: Path, classes: dict[str, int]) -> None:
    run_dir, probs, targets = _fit_and_test(in_tmp, classes)
    preds = probs.argmax(1)
    report = json.loads((run_dir / "metrics.json").read_text())
    assert report["samples"] == len(targets)
    assert report["acc"] == pytest.approx(accuracy_score(targets, preds), abs=1e-6)
    for key, fn in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score)):
        assert report[key] == pytest.approx(fn(targets, preds, average="macro", zero_division=0), abs=1e-6), key
    expected_auc = (
        roc_auc_score(targets, probs[:, 1])
        if probs.shape[1] == 2
        else roc_auc_score(targets, probs, multi_class="ovr", average="macro")
    )
    assert report["auroc"] == pytest.approx(expected_auc, abs=1e-4)
    names = sorted(classes, key=str.lower)
    assert list(report["per_class"]) == names
    assert_per_class_follows_sklearn(report, probs, targets)
    markdown = (run_dir / "report.md").read_text()
    assert f"| acc | {report['acc']:.4f} |" in markdown and f"| f1 | {report['f1']:.4f} |" in markdown
    for name in names:
        assert f"| {name} | {report['per_class'][name]['precision']:.4f} |" in markdown
    assert "![confusion matrix](confusion_matrix.png)" in markdown and "model:" in markdown
    assert "![class activation maps](cam.png)" in markdown and report["cam_seconds"] > 0  # the grid's cost
    for figure in FIGURES:
        with Image.open(run_dir / f"{figure}.png") as img:
            img.verify()
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    tags: set[str] = set()
    for events in run_dir.glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(events)).Load():
            tags |= {value.tag for value in event.summary.value}
    assert {f"test/{f}" for f in FIGURES} <= tags
    assert "_hparams_/session_start_info" in tags  # the HParams view
    assert {"gap/train_val_acc", f"val/acc_{names[0]}", "val/auroc", f"test/acc_{names[-1]}"} <= tags


def test_predict_folder_writes_csv_with_an_error_row(in_tmp: Path) -> None:
    import csv

    write_class_folders(in_tmp / "imgs", {"cat": 6, "dog": 6})
    inbox = in_tmp / "inbox"
    write_class_folders(inbox, {"new": 3})
    (inbox / "new" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (inbox / "new" / "truncated.jpg").write_bytes((inbox / "new" / "img_0.jpg").read_bytes()[:200])
    common = folder_args(in_tmp / "imgs", batch_size=4)
    cli_main(["fit", *common, "--trainer.max_epochs=1"])
    run = cli_main(["predict", *common, "--ckpt_path", "best", f"--data.init_args.predict_root={inbox}"])
    with (Path(str(run.trainer.log_dir)) / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in rows] == [
        "broken.jpg",
        "img_0.jpg",
        "img_1.jpg",
        "img_2.jpg",
        "truncated.jpg",
    ]
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["broken.jpg"]["error"] and by_name["truncated.jpg"]["error"]
    assert by_name["broken.jpg"]["predicted"] == ""
    model = run.model.eval()
    for name in ("img_0.jpg", "img_1.jpg", "img_2.jpg"):
        row = by_name[name]
        probs = [float(row["prob_cat"]), float(row["prob_dog"])]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5) and row["error"] == ""
        assert row["predicted"] == ["cat", "dog"][int(np.argmax(probs))]
        x = run.datamodule.predict_set.transform(load_image(inbox / "new" / name))  # the loaders' decoding
        with torch.no_grad():
            expected = model(x.unsqueeze(0)).softmax(1)[0]
        assert probs == pytest.approx(expected.tolist(), abs=1e-5)  # the same numbers as the model by hand


def test_report_metrics_with_an_absent_class_follow_sklearns_definitions() -> None:
    from lightning_modules.reporting.metrics import classification_report

    rng = np.random.default_rng(0)
    targets = np.array([0, 0, 2, 2, 2, 0, 2, 2])  # class 1 never occurs; 3 and 5 samples of the others
    probs = rng.dirichlet(np.ones(3), size=len(targets))
    report = classification_report(torch.from_numpy(probs).float(), torch.from_numpy(targets), ["a", "b", "c"])
    preds = probs.argmax(1)
    assert report["recall"] == pytest.approx(recall_score(targets, preds, average="macro", zero_division=0))
    assert report["f1"] == pytest.approx(f1_score(targets, preds, average="macro", zero_division=0))
    # AUROC by its definition (the chance that a sample of the class outranks one of another class, ties half),
    # one-vs-rest for each class that occurs, averaged over those: class 1 has no positives, so no ROC curve
    pairs = [
        np.mean([(p > n) + 0.5 * (p == n) for p in probs[targets == c, c] for n in probs[targets != c, c]])
        for c in (0, 2)
    ]
    assert report["auroc"] == pytest.approx(np.mean(pairs), abs=1e-6)
    logged = PresentClassesAUROC(3)  # what the console and TensorBoard show as test/auroc
    logged.update(torch.from_numpy(probs).float(), torch.from_numpy(targets))
    assert float(logged.compute()) == pytest.approx(report["auroc"], abs=1e-6)
    assert report["per_class"]["b"]["support"] == 0
    matrix = np.array(report["confusion_matrix"])
    assert not np.array_equal(matrix, matrix.T)  # a transposed matrix would be seen
    assert_per_class_follows_sklearn(report, probs, targets)
    from lightning_modules.reporting.report import render_markdown

    markdown = render_markdown(report, ["a", "b", "c"], Path("."))
    assert "**Absent from the test split: b.** Their recall and accuracy are not measured" in markdown
    report["per_class"]["b"]["support"] = 1
    assert "Absent" not in render_markdown(report, ["a", "b", "c"], Path("."))


def test_predictions_on_a_carved_test_split_name_the_files(tmp_path: Path) -> None:
    from datamodules import ImageFolderDataModule
    from lightning_modules.backbones.backbone import data_config_dict

    write_class_folders(tmp_path / "imgs", {"a": 5, "b": 5})
    dm = ImageFolderDataModule(
        root=str(tmp_path / "imgs"),
        num_workers=0,
        test_fraction=0.4,
        data_config=data_config_dict("timm/test_resnet", "none", 32),
    )
    dm.predict_dataloader()
    assert dm.predict_set is not None
    names = [dm.predict_set.name(i) for i in range(len(dm.predict_set))]
    assert len(names) == 4 and all(Path(n).is_file() for n in names)
    labels = [dm.predict_set[i].target for i in range(len(dm.predict_set))]
    assert [["a", "b"][lab] for lab in labels] == [Path(n).parent.name for n in names]  # type: ignore[index]
