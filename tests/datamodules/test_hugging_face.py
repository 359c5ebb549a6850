"""HuggingFaceDataModule on datasets written on the fly in `datasets`' real formats (a `save_to_disk` folder, parquet
files, an image-folder tree, the cache a Hub download leaves), through the DataModule and through `ftlab`."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import datasets
import pytest

from datamodules import CatsVsDogsDataModule, HuggingFaceDataModule
from tests.helpers.data import photo, write_class_folders
from tests.helpers.runs import entry_point

CLASSES = ["cat", "dog", "owl"]
CONFIG = {
    "input_size": [3, 32, 32],
    "interpolation": "bilinear",
    "mean": [0.5] * 3,
    "std": [0.5] * 3,
    "crop_pct": 1.0,
    "crop_mode": "center",
}
TINY = ["--model.backbone=timm/test_resnet", "--model.weights=none", "--model.image_size=32"]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`datasets`' cache in the test's folder (what `load_dataset` prepares, and the Hub downloads it holds)."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def _dataset(n: int, start: int = 0, labels: list[str] | None = None, bad: int | None = None) -> datasets.Dataset:
    """`n` photos (bytes in the table, as the Hub stores them), labels cycling over the classes; a ClassLabel column,
    or plain strings with `labels`; row `bad` holds bytes that are no image."""
    label = datasets.Value("string") if labels else datasets.ClassLabel(names=CLASSES)
    features = datasets.Features({"image": datasets.Image(), "label": label})
    images = [photo(start + i) for i in range(n)]
    rows = {
        "image": [{"bytes": b"not an image", "path": None} if i == bad else img for i, img in enumerate(images)],
        "label": [(labels or CLASSES)[i % 3] if labels else i % 3 for i in range(n)],
    }
    return datasets.Dataset.from_dict(rows, features=features)


def _saved(root: Path, bad: int | None = None) -> Path:
    """A `save_to_disk` DatasetDict with train, validation and test."""
    splits = {"train": _dataset(24, bad=bad), "validation": _dataset(6, 100), "test": _dataset(9, 200)}
    datasets.DatasetDict(splits).save_to_disk(str(root))
    return root


def _module(path: Path | str, **kwargs: Any) -> HuggingFaceDataModule:
    return HuggingFaceDataModule(path=str(path), batch_size=4, num_workers=0, data_config=CONFIG, **kwargs)


def test_a_save_to_disk_folder_keeps_its_splits_and_classlabel_order(tmp_path: Path) -> None:
    dm = _module(_saved(tmp_path / "saved"))
    assert dm.class_names == CLASSES
    dm.setup("fit")
    assert dm.split_sizes() == {"train": 24, "val": 6, "test": 9}  # the dataset's own: nothing carved
    batch = next(iter(dm.train_dataloader()))
    assert batch.inputs.shape == (4, 3, 32, 32) and batch.targets.max() <= 2
    assert sorted(dm.datasets["test"].dataset.targets) == [0] * 3 + [1] * 3 + [2] * 3
    assert dm.datasets["test"].name(4) == f"{tmp_path / 'saved'}:test[4]"


def test_parquet_files_and_an_image_folder_tree_read_through_datasets(tmp_path: Path) -> None:
    parquet = tmp_path / "parquet" / "data"
    parquet.mkdir(parents=True)
    _dataset(24).to_parquet(str(parquet / "train-00000-of-00001.parquet"))  # the Hub's file names
    _dataset(9, 200).to_parquet(str(parquet / "test-00000-of-00001.parquet"))
    dm = _module(tmp_path / "parquet", val_fraction=0.25)
    dm.setup("fit")
    assert dm.class_names == CLASSES and dm.split_sizes() == {"train": 18, "val": 6, "test": 9}  # val carved
    assert sorted(dm.datasets["val"].dataset.targets) == [0, 0, 1, 1, 2, 2]  # stratified, as every DataModule

    tree = tmp_path / "tree"
    write_class_folders(tree / "train", {"cat": 6, "dog": 6, "owl": 6})
    write_class_folders(tree / "test", {"cat": 2, "dog": 2, "owl": 2})
    for dm in (_module(tree), _module("imagefolder", data_dir=str(tree))):
        dm.setup("fit")
        assert dm.class_names == CLASSES and dm.split_sizes()["test"] == 6
        assert dm.datasets["test"].name(0).startswith(str(tree / "test"))  # imagefolder keeps each file's path


def test_a_cached_hub_dataset_loads_offline_and_an_uncached_one_says_what_to_download(
    tmp_path: Path, own_cache: Path
) -> None:
    """The cache a Hub download leaves (`<owner>___<name>/<config>/<version>/<hash>/`, Arrow files and
    dataset_info.json), written here by datasets' own parquet builder: with HF_HUB_OFFLINE (conftest) it loads."""
    assert datasets.config.HF_HUB_OFFLINE
    _dataset(12).to_parquet(str(tmp_path / "train.parquet"))
    builder = datasets.load_dataset_builder("parquet", data_files={"train": str(tmp_path / "train.parquet")})
    builder.download_and_prepare()
    prepared = Path(builder.cache_dir)
    cached = own_cache / "someone___pets" / "default" / "0.0.0" / prepared.name
    shutil.copytree(prepared, cached)
    for arrow in cached.glob("parquet-*.arrow"):
        arrow.rename(cached / arrow.name.replace("parquet-", "pets-"))
    info = json.loads((cached / "dataset_info.json").read_text())
    (cached / "dataset_info.json").write_text(json.dumps({**info, "dataset_name": "pets"}))
    dm = _module("someone/pets")
    dm.setup("fit")
    assert dm.class_names == CLASSES and sum(dm.split_sizes().values()) == 12

    with pytest.raises(Exception, match=r"'someone/other' is not in this machine's Hugging Face cache: offline") as err:
        _module("someone/other").setup("fit")
    assert "hf download someone/other --repo-type dataset --local-dir other" in str(err.value)


def test_plain_labels_become_sorted_classes_and_cats_vs_dogs_reads_any_classlabel(tmp_path: Path) -> None:
    datasets.DatasetDict({"train": _dataset(12, labels=["zebra", "ant", "mole"])}).save_to_disk(str(tmp_path / "s"))
    with pytest.warns(
        UserWarning, match=r"not a ClassLabel; its 3 distinct values, sorted, are the classes: ant, mole"
    ):
        names = _module(tmp_path / "s").class_names
    assert names == ["ant", "mole", "zebra"]
    saved = _saved(tmp_path / "three")  # the case that printed "2 classes (cat, dog)" with labels {0, 1, 2}
    assert CatsVsDogsDataModule(root=str(saved), num_workers=0, data_config=CONFIG).class_names == CLASSES


@pytest.mark.slow
def test_fit_test_and_predict_a_three_class_dataset_through_ftlab(
    in_tmp: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    saved = _saved(in_tmp / "saved", bad=5)
    data = ["--config", "experiments/data/hf_dataset.yaml", f"--data.init_args.path={saved}"]
    data += ["--data.init_args.num_workers=0", "--data.init_args.batch_size=8"]
    code, _, err = entry_point(["fit", *data, *TINY, *QUIET, "--trainer.max_epochs=2"], capfd)
    assert code == 0, err[-2000:]
    run = next((in_tmp / "runs").glob("*/version_0"))
    with (run / "bad_images.csv").open() as f:
        (bad,) = list(csv.DictReader(f))
    assert bad["path"] == f"{saved}:train[5]" and "not an image PIL can identify" in bad["reason"]
    code, _, err = entry_point(["test", *data, *TINY, *QUIET, "--ckpt_path=best"], capfd)
    assert code == 0, err[-2000:]
    report = json.loads((run / "metrics.json").read_text())
    assert report["samples"] == 9 and report["split_sizes"] == {"train": 24, "val": 6, "test": 9}
    assert list(report["per_class"]) == CLASSES
    code, _, err = entry_point(["predict", *data, *TINY, *QUIET, "--ckpt_path=best"], capfd)
    assert code == 0, err[-2000:]
    with (run / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "true", "predicted", "prob_cat", "prob_dog", "prob_owl", "error"]
    assert len(rows) == 9 and rows[0]["path"] == f"{saved}:test[0]" and rows[0]["true"] == "cat"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--data.init_args.image_column=picture"], ["image_column 'picture' is not a column", "['image', 'label']"]),
        (["--data.init_args.label_column=kind"], ["label_column 'kind' is not a column", "['image', 'label']"]),
        (["--data.init_args.test_split=holdout"], ["test_split 'holdout'", "['train', 'validation', 'test']"]),
        (["--data.init_args.path=someone/absent"], ["'someone/absent' is not in this machine's Hugging Face cache"]),
        (["--data.init_args.path=./no/such"], ["data.init_args.path no/such: no such folder"]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    in_tmp: Path, capfd: pytest.CaptureFixture[str], args: list[str], expected: list[str]
) -> None:
    saved = _saved(in_tmp / "saved")
    argv = ["fit", "--config", "experiments/data/hf_dataset.yaml", f"--data.init_args.path={saved}", *args]
    code, _, err = entry_point([*argv, *TINY, *QUIET, "--trainer.fast_dev_run=true"], capfd)
    lines = [line for line in err.splitlines() if line.startswith("ftlab: error:")]
    assert code == 2 and len(lines) == 1 and len(lines[0]) < 500 and "Traceback" not in err, err[-2000:]
    for text in expected:
        assert text in lines[0], (text, lines[0])


def test_a_missing_or_unlabelled_split(tmp_path: Path) -> None:
    unlabelled = _dataset(6, 300).cast_column("label", datasets.Value("int64")).map(lambda row: {"label": -1})
    datasets.DatasetDict({"train": _dataset(24), "test": unlabelled}).save_to_disk(str(tmp_path / "s"))
    dm = _module(tmp_path / "s", test_fraction=0.25)
    with pytest.warns(UserWarning, match=r"split 'test' .* has no labels \(all -1\): test is carved from train"):
        dm.setup("fit")
    assert dm.split_sizes()["test"] == 6
