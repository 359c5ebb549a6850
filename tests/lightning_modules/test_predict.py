"""`ftlab predict` from a checkpoint alone: the checkpoint gives the model, its preprocessing and the class names;
other classes in the data, a missing checkpoint and an existing predictions file are never silently accepted."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from datamodules.common import ConfigError
from datamodules.images import load_image
from lightning_modules.cli.main import cli_main
from lightning_modules.module import FineTuneModule
from lightning_modules.predictor import Predictor
from tests.helpers import REPO
from tests.helpers.data import write_class_folders
from tests.helpers.runs import folder_args

CLASSES = ["cat", "Dog", "fox"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 3-class folder model (28 px), its best checkpoint, and a folder of new images; the training folder is then
    moved away, so nothing can come from it."""
    root = tmp_path_factory.mktemp("predict")
    (root / "experiments").symlink_to(REPO / "experiments")
    write_class_folders(root / "imgs", dict.fromkeys(CLASSES, 5))
    write_class_folders(root / "inbox" / "any", {"new": 3}, start=100)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        args = [*folder_args(root / "imgs", batch_size=4), "--model.image_size=28", "--trainer.max_epochs=1"]
        fit = cli_main(["fit", *args])
        ckpt = Path(fit.trainer.checkpoint_callback.best_model_path).resolve()  # type: ignore[union-attr]
    shutil.move(root / "imgs", root / "moved_away")
    return {"root": root, "ckpt": ckpt, "args": args, "inbox": root / "inbox"}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_predict_needs_only_the_checkpoint_and_a_folder(trained: dict[str, Any], monkeypatch: Any) -> None:
    elsewhere = trained["root"] / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # no experiments/, no config, no training data
    run = cli_main(
        ["predict", "--ckpt_path", str(trained["ckpt"]), f"--data.init_args.predict_root={trained['inbox']}"]
    )
    assert Path(str(run.trainer.log_dir)) == trained["ckpt"].parent.parent  # into the checkpoint's run folder
    rows = _rows(Path(str(run.trainer.log_dir)) / "predictions.csv")
    assert list(rows[0]) == ["path", "true", "predicted", *(f"prob_{n}" for n in CLASSES), "error"]
    assert len(rows) == 3 and all(r["error"] == "" for r in rows)
    assert run.datamodule.data_config.input_size == (3, 28, 28)  # the checkpoint's preprocessing, not 224 px
    model = FineTuneModule.load_from_checkpoint(trained["ckpt"], weights_only=True).eval()
    for row in rows:
        x = run.datamodule.predict_set.transform(load_image(row["path"]))
        with torch.no_grad():
            expected = model(x.unsqueeze(0)).softmax(1)[0].tolist()
        assert [float(row[f"prob_{n}"]) for n in CLASSES] == pytest.approx(expected, abs=1e-5)
        assert row["predicted"] == CLASSES[max(range(3), key=expected.__getitem__)]


def test_data_with_other_classes_is_a_clear_error(trained: dict[str, Any], monkeypatch: Any) -> None:
    monkeypatch.chdir(trained["root"])
    fruit = trained["root"] / "fruit"
    write_class_folders(fruit, {"apple": 2, "mango": 2, "zebra": 2})
    args = [*trained["args"], f"--data.init_args.root={fruit}", "--data.init_args.class_names=null"]
    with pytest.raises(ConfigError, match=r"fruit has folders \['apple', 'mango', 'zebra'\] that are not among"):
        cli_main(["predict", *args, "--ckpt_path", str(trained["ckpt"])])  # the test split of the wrong folder
    explicit = [*args, "--data.init_args.class_names=[apple,mango,zebra]"]
    with pytest.raises(ConfigError, match=r"was trained on 3 classes \(\['cat', 'Dog', 'fox'\]\) but the data has 3"):
        cli_main(["predict", *explicit, "--ckpt_path", str(trained["ckpt"])])
    digits = ["--data=datamodules.DigitsDataModule", "--data.init_args.num_workers=0"]
    with pytest.raises(ConfigError, match=r"but the data has 10 \(\['0', '1'"):
        cli_main(["test", "--ckpt_path", str(trained["ckpt"]), *digits])


def test_predict_without_a_checkpoint_is_an_error_unless_asked(trained: dict[str, Any], monkeypatch: Any) -> None:
    monkeypatch.chdir(trained["root"])
    inbox = f"--data.init_args.predict_root={trained['inbox']}"
    with pytest.raises(ConfigError, match=r"predict needs --ckpt_path .* --untrained true"):
        cli_main(["predict", *trained["args"], inbox, "--data.init_args.class_names=[a,b,c]"])
    run = cli_main(["predict", *trained["args"], inbox, "--data.init_args.class_names=[a,b,c]", "--untrained=true"])
    assert len(_rows(Path(str(run.trainer.log_dir)) / "predictions.csv")) == 3


def test_an_existing_predictions_file_is_never_overwritten(trained: dict[str, Any], monkeypatch: Any) -> None:
    monkeypatch.chdir(trained["root"])
    common = ["predict", "--ckpt_path", str(trained["ckpt"]), f"--data.init_args.predict_root={trained['inbox']}"]
    first = Path(str(cli_main([*common, "--trainer.logger.init_args.version=same"]).trainer.log_dir))
    before = (first / "predictions.csv").read_bytes()
    other = ["--data.init_args.predict_root", str(trained["inbox"] / "any" / "new")]  # another input, same run
    second = Path(str(cli_main([*common, *other, "--trainer.logger.init_args.version=same"]).trainer.log_dir))
    assert second == first
    assert (first / "predictions.csv").read_bytes() == before
    assert len(_rows(first / "predictions_2.csv")) == 3


def test_the_python_predictor_matches_ftlab_predict(trained: dict[str, Any], monkeypatch: Any) -> None:
    """`Predictor.from_checkpoint` on the same folder gives `ftlab predict`'s rows to 1e-6 (the CSV's 6 decimals),
    the unreadable file as an error too; a PIL image gives what its file gives."""
    inbox = trained["root"] / "inbox_with_a_bad_file"
    shutil.copytree(trained["inbox"], inbox)
    Image.open(next(inbox.rglob("*.jpg"))).save(inbox / "any" / "lossless.png")
    (inbox / "any" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    monkeypatch.chdir(trained["root"])
    run = cli_main(["predict", "--ckpt_path", str(trained["ckpt"]), f"--data.init_args.predict_root={inbox}"])
    written = max(Path(str(run.trainer.log_dir)).glob("predictions*.csv"), key=lambda p: p.stat().st_mtime_ns)
    rows = {row["path"]: row for row in _rows(written)}
    predictor = Predictor.from_checkpoint(trained["ckpt"])
    predictions = predictor(inbox)
    assert [p.source for p in predictions] == sorted(rows) and len(rows) == 5
    for p in predictions:
        row = rows[p.source]
        if p.error is not None:
            assert row["error"] == p.error and p.source.endswith("broken.jpg") and p.label is None
            continue
        assert row["predicted"] == p.label and row["error"] == ""
        assert [float(row[f"prob_{n}"]) for n in CLASSES] == pytest.approx(list(p.probabilities.values()), abs=1e-6)
    png = inbox / "any" / "lossless.png"
    (from_pil,) = predictor(Image.open(png))
    (from_file,) = predictor(png)
    assert from_pil.source == "image 0" and from_pil.probabilities == pytest.approx(from_file.probabilities, abs=1e-6)


@pytest.mark.slow
def test_predict_explain_writes_a_map_over_each_image(trained: dict[str, Any], monkeypatch: Any) -> None:
    """`--explain`: one PNG per image at the image's own size in `<csv>_cam/` beside the CSV, named in its `cam`
    column; the Predictor explains the same class it predicts."""
    monkeypatch.chdir(trained["root"])
    inbox = f"--data.init_args.predict_root={trained['inbox']}"
    run = cli_main(["predict", "--ckpt_path", str(trained["ckpt"]), inbox, "--explain"])
    written = max(Path(str(run.trainer.log_dir)).glob("predictions*.csv"), key=lambda p: p.stat().st_mtime_ns)
    rows = _rows(written)
    assert len(rows) == 3 and all(r["cam"].startswith(f"{written.stem}_cam/") for r in rows)
    for row in rows:
        with Image.open(written.parent / row["cam"]) as cam, Image.open(row["path"]) as photo:
            assert cam.size == photo.size
    explained = Predictor.from_checkpoint(trained["ckpt"]).explain([r["path"] for r in rows])
    assert [e.label for e in explained] == [r["predicted"] for r in rows]
