"""The bad-input table: every input a user can get wrong, through the `ftlab` entry point (`cli.main`, what the
console script runs), each ending with the exit status it should, no traceback, and the file or key named.

Mistakes end with exit status 2 and one `ftlab: error:` line. Inputs that are odd but valid (a 1x1 image, an
animated GIF, a non-UTF-8 file name ...) end with status 0 and the file named in predictions.csv or
bad_images.csv. A prior run's checkpoints sit in the same runs folder throughout: no case may change them.
docs/reliability.md.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.common import ConfigError
from datamodules.folder import discover_classes, folder_files
from lightning_modules.cli import main as cli
from lightning_modules.module import FineTuneModule
from lightning_modules.predictor import Predictor
from tests.helpers import REPO
from tests.helpers.data import image_exif, photo, write_cifar, write_class_folders, write_mnist
from tests.helpers.runs import FAST, entry_point, folder_args, ftlab, inject, start_ftlab

TINY = ["--model.backbone=timm/test_resnet", "--model.weights=none", "--model.image_size=32"]
SHORT = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1"]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
# a strategy-free experiment on the ten digit classes (sklearn's, in memory)
BASE = """
model: {backbone: timm/test_resnet, weights: none, image_size: 32}
data:
  class_path: datamodules.DigitsDataModule
  init_args: {batch_size: 8, num_workers: 0}
"""
NON_UTF8 = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes in a file name: not UTF-8
MARKER = "PAYLOAD_RAN"


class Payload:
    """Unpickling this runs a shell command that creates MARKER: what a crafted pickle would do."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {MARKER}",))


def _folder(root: Path, classes: dict[str, int]) -> Path:
    write_class_folders(root, classes)
    return root


def _ckpt_variant(source: Path, target: Path, change: Any) -> Path:
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, target)
    return target


def _build_world(root: Path) -> dict[str, str]:
    """Every bad input, written in its real format; returns the placeholders the cases use."""
    (root / "experiments").symlink_to(REPO / "experiments")
    (root / "base.yaml").write_text(BASE)
    (root / "a_file").write_text("not a folder")
    (root / "broken.yaml").write_text("model: {backbone: [timm/test_resnet\n")
    stage = "trainer:\n  callbacks+:\n    - class_path: lightning_modules.FreezeUnfreeze\n"
    (root / "stage.yaml").write_text(stage + "      init_args: {unfreeze_at_epoch: 5, stages: [layer9]}\n")
    strategy = "trainer:\n  callbacks+:\n    - class_path: lightning_modules.FreezeUnfreezee\n"
    (root / "strategy.yaml").write_text(strategy)
    (root / "rate.yaml").write_text(stage + "      init_args: {lr_factor: 0}\n")
    (root / "empty.yaml").write_text("# nothing but a comment\n")
    _folder(root / "ab", {"a": 4, "b": 4})
    (root / "empty_root").mkdir()
    _folder(root / "one_class", {"only": 4})
    _folder(root / "empty_class", {"a": 4, "b": 4})
    (root / "empty_class" / "c").mkdir()
    _folder(root / "one_each", {"a": 1, "b": 1})
    unreadable = _folder(root / "unreadable_class", {"a": 4})
    zeros = root / "zero_bytes"
    for folder, count in ((unreadable / "b", 5), (zeros / "a", 3), (zeros / "b", 3)):
        folder.mkdir(parents=True)
        for i in range(count):
            (folder / f"{i}.jpg").write_bytes(b"")  # 0 bytes: the header check leaves each out
    (root / "hf_empty").mkdir()
    (root / "hf_not_a_dataset").mkdir()
    (root / "hf_not_a_dataset" / "dataset_info.json").write_text("{}")  # metadata only: datasets finds no data
    _folder(root / "two_each", {"a": 2, "b": 2})
    loops = _folder(root / "loops", {"a": 4, "b": 4})
    (loops / "a" / "cycle").symlink_to(loops / "a")  # a folder loop
    (loops / "a" / "x.jpg").symlink_to(loops / "a" / "y.jpg")  # a file loop: x -> y -> x
    (loops / "a" / "y.jpg").symlink_to(loops / "a" / "x.jpg")
    for name, change in {
        "cifar_garbage": lambda f: f.write_bytes(b"\x80\x04garbage, not a pickle"),
        "cifar_no_data": lambda f: f.write_bytes(pickle.dumps({"labels": [1, 2]})),
        "cifar_bad_shape": lambda f: f.write_bytes(
            pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [1, 2]})
        ),
        "cifar_payload": lambda f: f.write_bytes(pickle.dumps({"data": Payload(), "labels": [1]})),
    }.items():
        change(write_cifar(root / name, per_batch=4) / "data_batch_1")
    raw = write_mnist(root / "mnist_cut", gz=True)
    images = raw / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:60])
    inbox = {name: root / f"inbox_{name}" for name in ("empty", "exif", "tiny", "png16", "gif", "bytes")}
    for folder in inbox.values():
        folder.mkdir()
    (inbox["empty"] / "notes.txt").write_text("no images here")
    photo(1, (40, 24)).save(inbox["exif"] / "turned.jpg", exif=image_exif(orientation=8))
    photo(2, (1, 1)).save(inbox["tiny"] / "one_pixel.png")
    Image.fromarray(np.full((30, 30), 40000, dtype=np.uint16)).save(inbox["png16"] / "deep.png")
    frames = [photo(i, (24, 24)).convert("P") for i in range(3)]
    frames[0].save(inbox["gif"] / "moving.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    photo(3, (24, 24)).save(inbox["bytes"] / NON_UTF8)
    place = {f"INBOX_{k.upper()}": str(v) for k, v in inbox.items()}
    return {
        **place,
        **{
            k: str(root / k.lower())
            for k in (
                *("AB", "EMPTY_ROOT", "ONE_CLASS", "EMPTY_CLASS", "LOOPS", "ONE_EACH", "TWO_EACH"),
                *("UNREADABLE_CLASS", "ZERO_BYTES", "HF_EMPTY", "HF_NOT_A_DATASET"),
            )
        },
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The bad inputs, and a prior run (`runs/prior`) whose checkpoints every case must leave as they were."""
    root = tmp_path_factory.mktemp("bad_inputs")
    places = _build_world(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        prior = cli.cli_main(["fit", "--config", "base.yaml", *SHORT, *QUIET, "--trainer.logger.init_args.name=prior"])
    ckpts = root / str(prior.trainer.log_dir) / "checkpoints"
    last = ckpts / "last.ckpt"
    bad = {"garbage": b"not a checkpoint at all" * 20, "empty": b""}
    for name, data in bad.items():
        (root / f"{name}.ckpt").write_bytes(data)
    (root / "cut.ckpt").write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    torch.save({"state_dict": {}, "hyper_parameters": Payload()}, root / "payload.ckpt")
    _ckpt_variant(last, root / "nameless.ckpt", lambda c: c["hyper_parameters"].pop("backbone"))
    places.update({"CKPT": str(last.resolve()), **{f"{n.upper()}_CKPT": str(root / f"{n}.ckpt") for n in bad}})
    places.update({k: str(root / v) for k, v in [("CUT_CKPT", "cut.ckpt"), ("PAYLOAD_CKPT", "payload.ckpt")]})
    places.update({"NAMELESS_CKPT": str(root / "nameless.ckpt"), "A_FILE": str(root / "a_file")})
    damaged = root / "runs" / "damaged" / "version_0"  # a copy of the prior run whose last.ckpt was cut short
    shutil.copytree(ckpts.parent, damaged)
    cut = damaged / "checkpoints" / "last.ckpt"
    cut.write_bytes(cut.read_bytes()[:50000])
    (best,) = (damaged / "checkpoints").glob("best-*.ckpt")
    places["DAMAGED_BEST"] = str(best.relative_to(root))
    yield {"root": root, "places": places, "prior": ckpts}


def _fingerprint(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


FIT = ["fit", "--config", "base.yaml", *FAST]
TEST = ["test", "--config", "base.yaml", *QUIET, "--trainer.limit_test_batches=1"]
PREDICT = ["predict", *QUIET, "--ckpt_path", "CKPT"]
FOLDER = "--data=datamodules.ImageFolderDataModule"
HF = "--data=datamodules.HuggingFaceDataModule"
CIFAR = [*FIT, "--data=datamodules.CIFAR10DataModule", "--data.init_args.download=false"]
MNIST = [*FIT, "--data=datamodules.MNISTDataModule", "--data.init_args.download=false"]
RESUME_PRIOR = ["--trainer.logger.init_args.name=prior", "--ckpt_path", "last"]

# name: (argv, exit status, texts the error line (status 2) or the run's output files (status 0) must hold)
CASES: dict[str, tuple[list[str], int, list[str]]] = {
    "unknown backbone": ([*FIT, "--model.backbone=timm/test_resnett"], 2, ["no model 'test_resnett'", "test_resnet"]),
    "unknown stage": ([*FIT, "--config", "stage.yaml"], 2, ["no stage 'layer9'", "did you mean ['layer4'"]),
    "unknown augmentation": ([*FIT, "--data.init_args.augment=fancy"], 2, ["data.augment 'fancy'", "basic"]),
    "unknown key": ([*FIT, "--model.bakcbone=timm/test_resnet"], 2, ["unknown key model.bakcbone", "model.backbone"]),
    "YAML syntax error": ([*FIT, "--config", "broken.yaml"], 2, ["broken.yaml", "line"]),
    "string for a number": (
        [*FIT, *RESUME_PRIOR, "--data.init_args.batch_size=many"],
        2,
        ["data.init_args.batch_size: 'many' is not valid; expected int"],
    ),
    "unknown strategy class": ([*FIT, "--config", "strategy.yaml"], 2, ["FreezeUnfreezee"]),
    "missing data path": ([*FIT, FOLDER, "--data.init_args.root=no/such/folder"], 2, ["not found at", "no/such"]),
    "data root is a file": ([*FIT, FOLDER, "--data.init_args.root=A_FILE"], 2, ["a_file is a file, not a folder"]),
    "empty data root": ([*FIT, FOLDER, "--data.init_args.root=EMPTY_ROOT"], 2, ["empty_root has 0 class folder"]),
    "single-class root": ([*FIT, FOLDER, "--data.init_args.root=ONE_CLASS"], 2, ["has 1 class folder(s) ['only']"]),
    "empty class folder": ([*FIT, FOLDER, "--data.init_args.root=EMPTY_CLASS"], 2, ["without images: ['c']"]),
    "one image per class": (
        [*FIT, FOLDER, "--data.init_args.root=ONE_EACH"],
        2,
        ["cannot carve test from train: class(es) ['a', 'b'] have a single image left", "3 per class"],
    ),
    "two images per class": (
        [*FIT, FOLDER, "--data.init_args.root=TWO_EACH"],
        2,
        ["cannot carve val from train: class(es) ['a', 'b'] have a single image left"],
    ),
    "a class whose files are all unreadable": (
        ["fit", "--config", "base.yaml", *SHORT, *QUIET, FOLDER, "--data.init_args.root=UNREADABLE_CLASS"],
        2,
        ["train has no readable image of class(es) ['b']", "5 unreadable file(s)", "bad_images.csv"],
    ),
    "every file 0 bytes": (
        [*FIT, FOLDER, "--data.init_args.root=ZERO_BYTES"],
        2,
        ["train has no readable image of class(es) ['a', 'b']", "6 unreadable file(s)"],
    ),
    "Hugging Face: an empty folder": (
        [*FIT, HF, "--data.init_args.path=HF_EMPTY"],
        2,
        ["hf_empty holds no dataset (it is empty)", "save_to_disk"],
    ),
    "Hugging Face: a folder that is not a dataset": (
        [*FIT, HF, "--data.init_args.path=HF_NOT_A_DATASET"],
        2,
        ["hf_not_a_dataset holds no dataset (datasets finds no data in its 1 file(s): .json)"],
    ),
    "CIFAR batch not a pickle": ([*CIFAR, "--data.init_args.root=cifar_garbage"], 2, ["cifar_garbage", "data_batch_1"]),
    "CIFAR batch without data": ([*CIFAR, "--data.init_args.root=cifar_no_data"], 2, ["data_batch_1 has no 'data'"]),
    "CIFAR batch of wrong shape": ([*CIFAR, "--data.init_args.root=cifar_bad_shape"], 2, ["N x 3072", "data_batch_1"]),
    "CIFAR batch with code in it": ([*CIFAR, "--data.init_args.root=cifar_payload"], 2, ["refers to posix.system"]),
    "truncated MNIST .gz": (
        [
            *FIT,
            "--data=datamodules.MNISTDataModule",
            "--data.init_args.root=mnist_cut",
            "--data.init_args.download=false",
        ],
        2,
        ["train-images-idx3-ubyte.gz cannot be read"],
    ),
    "missing checkpoint": ([*TEST, "--ckpt_path", "no/such.ckpt"], 2, ["no/such.ckpt does not exist"]),
    "checkpoint path is a folder": ([*TEST, "--ckpt_path", "AB"], 2, ["ab is a folder, not a checkpoint file"]),
    "truncated last checkpoint": (
        [*TEST, "--trainer.logger.init_args.name=damaged", "--ckpt_path", "last"],
        2,
        ["damaged/version_0/checkpoints/last.ckpt cannot be read", "the newest intact checkpoint is DAMAGED_BEST"],
    ),
    "garbage checkpoint": ([*TEST, "--ckpt_path", "GARBAGE_CKPT"], 2, ["garbage.ckpt cannot be read"]),
    "empty checkpoint": ([*TEST, "--ckpt_path", "EMPTY_CKPT"], 2, ["empty.ckpt is empty"]),
    "truncated checkpoint": ([*TEST, "--ckpt_path", "CUT_CKPT"], 2, ["cut.ckpt cannot be read", "truncated"]),
    "checkpoint with code in it": ([*TEST, "--ckpt_path", "PAYLOAD_CKPT"], 2, ["payload.ckpt holds objects other"]),
    "class count": ([*TEST, "--ckpt_path", "CKPT", FOLDER, "--data.init_args.root=AB"], 2, ["10 classes", "has 2"]),
    "checkpoint of another backbone": (
        [*TEST, "--ckpt_path", "NAMELESS_CKPT", "--model.backbone=timm/test_efficientnet"],
        2,
        ["nameless.ckpt does not fit model.backbone timm/test_efficientnet"],
    ),
    "config of another backbone than the checkpoint": (
        [*TEST, "--ckpt_path", "CKPT", "--model.backbone=timm/test_efficientnet"],
        0,
        ["model.backbone 'timm/test_efficientnet' -> 'timm/test_resnet'"],
    ),
    "logger save_dir not writable": (
        [*FIT, "--trainer.logger.init_args.save_dir=A_FILE/runs"],
        2,
        ["trainer.logger.init_args.save_dir: cannot write runs to", "a_file/runs"],
    ),
    "default_root_dir not writable": (
        [*FIT, "--trainer.default_root_dir=A_FILE/elsewhere"],
        2,
        ["trainer.default_root_dir: cannot write runs to", "a_file/elsewhere/runs"],
    ),
    "negative learning rate": ([*FIT, "--model.lr=-1"], 2, ["model.lr is -1", "allowed (0, inf)"]),
    "negative optimizer learning rate": (
        [*FIT, "--model.optimizer=torch.optim.AdamW", "--model.optimizer.init_args.lr=-1"],
        2,
        ["model.optimizer.init_args.lr is -1", "allowed (0, inf)"],
    ),
    "negative weight decay": (
        [*FIT, "--model.optimizer=torch.optim.AdamW", "--model.optimizer.init_args.weight_decay=-0.1"],
        2,
        ["model.optimizer.init_args.weight_decay is -0.1", "allowed [0, inf)"],
    ),
    "batch size 0": ([*FIT, "--data.init_args.batch_size=0"], 2, ["data.init_args.batch_size is 0", "[1, inf)"]),
    "batch size -1": ([*FIT, "--data.init_args.batch_size=-1"], 2, ["data.init_args.batch_size is -1", "[1, inf)"]),
    "workers -1": ([*FIT, "--data.init_args.num_workers=-1"], 2, ["data.init_args.num_workers is -1", "[0, inf)"]),
    "image size 0": ([*FIT, "--model.image_size=0"], 2, ["error: model.image_size is 0: allowed [16, inf)"]),
    "no epochs": ([*FIT, "--trainer.max_epochs=0"], 2, ["trainer.max_epochs is 0", "allowed [1, inf)"]),
    "label smoothing 1": ([*FIT, "--model.label_smoothing=1"], 2, ["model.label_smoothing is 1", "[0, 1)"]),
    "strategy rate 0": ([*FIT, "--config", "rate.yaml"], 2, ["FreezeUnfreeze.lr_factor is 0", "(0, inf)"]),
    "config file is a folder": (["fit", "--config", "experiments"], 2, ["config file experiments is a folder"]),
    "empty config file": (["fit", "--config", "empty.yaml"], 2, ["config file empty.yaml is empty"]),
    "predict without a checkpoint": (["predict", "--config", "base.yaml", *QUIET], 2, ["predict needs --ckpt_path"]),
    "predict folder with no images": (
        [*PREDICT, "--data.init_args.predict_root=INBOX_EMPTY"],
        2,
        ["inbox_empty holds no image files"],
    ),
    "symlink loops under the root": (
        ["fit", *TINY, *SHORT, *QUIET, FOLDER, "--data.init_args.root=LOOPS", "--data.init_args.num_workers=0"],
        0,
        ["x.jpg", "y.jpg"],  # both file-loop links in bad_images.csv; the folder loop is not followed
    ),
    "EXIF orientation 8": ([*PREDICT, "--data.init_args.predict_root=INBOX_EXIF"], 0, ["turned.jpg"]),
    "1x1 image": ([*PREDICT, "--data.init_args.predict_root=INBOX_TINY"], 0, ["one_pixel.png"]),
    "16-bit PNG": ([*PREDICT, "--data.init_args.predict_root=INBOX_PNG16"], 0, ["deep.png"]),
    "animated GIF": ([*PREDICT, "--data.init_args.predict_root=INBOX_GIF"], 0, ["moving.gif"]),
    "file name with non-UTF-8 bytes": ([*PREDICT, "--data.init_args.predict_root=INBOX_BYTES"], 0, [NON_UTF8]),
}


def _outputs(out: str) -> str:
    """predictions.csv or bad_images.csv of the run the output names, read as written (non-UTF-8 names intact)."""
    found = re.search(r"Predictions: (\S+)", out) or re.search(r"Run directory: (\S+)", out)
    assert found, out
    path = Path(found.group(1))
    path = path if path.suffix == ".csv" else path / "bad_images.csv"
    if not path.is_file():
        return ""
    with path.open(newline="", errors="surrogateescape") as f:
        rows = list(csv.DictReader(f))
    assert all(not row.get("error") for row in rows) or "bad_images" in path.name, rows
    return "\n".join(row["path"] for row in rows)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(
    case: str, world: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    argv, status, expected = CASES[case]
    places = world["places"]
    names = "|".join(sorted(places, key=len, reverse=True))
    argv, expected = ([re.sub(names, lambda m: places[m.group(0)], a) for a in texts] for texts in (argv, expected))
    before = _fingerprint(world["prior"])
    monkeypatch.chdir(world["root"])
    code, out, err = entry_point(argv, capfd)
    assert code == status, err[-2000:]
    assert "Traceback" not in err and "weights_only=False" not in err
    if status == 2:
        lines = [line for line in err.splitlines() if line.startswith("ftlab: error:")]
        assert len(lines) == 1 and len(lines[0]) < 500, err[-2000:]
        named = lines[0]
    else:
        named = err + _outputs(out)
    for text in expected:
        assert text in named, (text, named)
    assert not (world["root"] / MARKER).exists()  # no pickle ran its payload
    assert _fingerprint(world["prior"]) == before  # the prior run's checkpoints: untouched


@pytest.mark.slow
def test_small_rows_failed_setup_single_file_predict_second_test_small_set_plain_predict(
    in_tmp: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A fit failing at setup leaves no run folder; predict takes one image or a list; a second test keeps the first
    report; the shipped defaults raise no Lightning warning on a small set; predict says nothing of training."""
    _folder(in_tmp / "one_each", {"a": 1, "b": 1})
    _folder(in_tmp / "small", {"a": 12, "b": 12})
    common = [*folder_args(in_tmp / "small", batch_size=8), "--trainer.enable_model_summary=false"]
    fail = [*folder_args(in_tmp / "one_each", batch_size=8), "--trainer.max_epochs=1"]
    code, _, err = entry_point(["fit", *fail], capfd)
    assert code == 2 and "cannot carve test" in err
    assert not (in_tmp / "runs" / "image_folder").exists() or not list((in_tmp / "runs" / "image_folder").iterdir())
    code, _, err = entry_point(["fit", *common, "--trainer.max_epochs=2"], capfd)
    run = in_tmp / "runs" / "image_folder" / "version_0"  # the first good run is version_0
    assert code == 0 and run.is_dir(), err[-2000:]
    assert "smaller than the logging interval" not in err  # 3 batches an epoch, the defaults log every 10 steps

    for _ in range(2):
        code, out, err = entry_point(["test", *common, "--ckpt_path=best"], capfd)
        assert code == 0, err[-2000:]
    first = json.loads((run / "metrics.json").read_text())
    assert "Test report: " in out and out.strip().endswith("version_0") and (run / "report_2.md").is_file()
    second = json.loads((run / "metrics_2.json").read_text())
    assert second["acc"] == first["acc"] and (run / "confusion_matrix_2.png").is_file()
    assert "(confusion_matrix_2.png)" in (run / "report_2.md").read_text()
    assert "(confusion_matrix.png)" in (run / "report.md").read_text()

    image = next((in_tmp / "small" / "a").iterdir())
    plain = ["predict", "--ckpt_path", str(next((run / "checkpoints").glob("best-*.ckpt"))), *QUIET]
    for given, rows in ((str(image), 1), (f"[{image},{in_tmp / 'small' / 'b'}]", 13)):
        code, out, err = entry_point([*plain, f"--data.init_args.predict_root={given}"], capfd)
        assert code == 0, err[-2000:]
        assert "Please add the following callbacks" not in err and "the model is built as" not in err
        written = Path(re.search(r"Predictions: (\S+)", out).group(1))  # type: ignore[union-attr]
        with written.open() as f:
            assert len(list(csv.DictReader(f))) == rows
    code, _, err = entry_point([*plain, f"--data.init_args.predict_root={in_tmp / 'nothing.jpg'}"], capfd)
    assert code == 2 and "data.init_args.predict_root" in err and "nothing.jpg: no such file or folder" in err


@pytest.mark.slow
def test_ckpt_path_last_names_a_checkpoint_of_the_newest_run_never_an_older_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.yaml").write_text(BASE)
    fit = ["fit", "--config", "base.yaml", *SHORT, *QUIET, "--trainer.logger.init_args.name=x"]
    assert entry_point(fit, capfd)[0] == 0  # version_0: finished, with its checkpoints
    monkeypatch.setenv("FTLAB_TEST_FAIL", "1")  # version_1: cut before its first checkpoint (a crash at epoch 0)
    crash = ["--trainer.callbacks+=tests.helpers.faults.FailAtEpoch", "--trainer.callbacks.epoch=0"]
    with pytest.raises(RuntimeError, match="injected crash"):
        entry_point([*fit, *crash], capfd)
    monkeypatch.delenv("FTLAB_TEST_FAIL")
    runs = tmp_path / "runs" / "x"
    assert not (runs / "version_1" / "checkpoints").exists() and (runs / "version_1" / "config.yaml").is_file()
    finished = runs / "version_0" / "checkpoints" / "last.ckpt"
    before = finished.read_bytes()

    code, _, err = entry_point(
        [*fit, "--ckpt_path", "last"], capfd
    )  # Lightning's old rule resumed version_0: trained nothing
    lines = [line for line in err.splitlines() if line.startswith("ftlab:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert lines[0] == (
        "ftlab: error: runs/x/version_1 has no last*.ckpt (its fit stopped before its first checkpoint); older runs "
        "with one: version_0: pass --ckpt_path runs/x/version_0/checkpoints/last.ckpt"
    )
    assert finished.read_bytes() == before and not (runs / "version_2").exists()  # nothing ran

    assert entry_point(fit, capfd)[0] == 0  # version_2, finished; then version_0's last.ckpt is touched after it
    newest = runs / "version_2" / "checkpoints" / "last.ckpt"
    later = newest.stat().st_mtime + 60
    for path in (finished, finished.parent):
        os.utime(path, (later, later))
    code, out, err = entry_point(
        [
            "test",
            "--config",
            "base.yaml",
            *QUIET,
            "--trainer.limit_test_batches=1",
            "--trainer.logger.init_args.name=x",
            "--ckpt_path",
            "last",
        ],
        capfd,
    )
    assert code == 0, err[-2000:]
    assert "Run directory: runs/x/version_2" in out  # the test ran on version_2's checkpoint, in its folder
    assert (runs / "version_2" / "metrics.json").is_file() and not (runs / "version_0" / "metrics.json").exists()


# a fit long enough to stop in the middle: two loader worker processes, 0.2 s a batch, 6 batches an epoch
LONG = [*QUIET, "--data.init_args.num_workers=2", "--trainer.max_epochs=2", "--trainer.limit_train_batches=6"]
LONG += ["--trainer.limit_val_batches=2"]


def _one_line(err: str) -> str:
    """The one `ftlab:` line of a run's standard error, with no traceback beside it."""
    lines = [line for line in err.splitlines() if line.startswith("ftlab:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def _ckpt(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "to"), [(signal.SIGTERM, "process"), (signal.SIGTERM, "group"), (signal.SIGINT, "group")]
)
def test_a_signal_mid_fit_stops_with_one_line_naming_the_checkpoint_and_the_resume_command(
    world: dict[str, Any], signum: int, to: str
) -> None:
    root, name = world["root"], f"{signal.Signals(signum).name.lower()}_to_{to}"
    before = _fingerprint(world["prior"])
    slow = inject(root, "slow", "tests.helpers.faults.SlowBatches", seconds=0.2)
    fit = ["fit", "--config", "base.yaml", *LONG, f"--trainer.logger.init_args.name={name}", *slow]
    last = root / "runs" / name / "version_0" / "checkpoints" / "last.ckpt"
    with start_ftlab(root, *fit, start_new_session=True) as child:  # its own process group, its workers in it
        deadline = time.monotonic() + 300
        while not last.is_file() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert last.is_file(), child.communicate()[1][-3000:]
        if to == "group":
            os.killpg(child.pid, signum)  # what a terminal's Ctrl+C, CI or `kill -TERM -<pgid>` does
        else:
            child.send_signal(signum)  # what `kill -TERM <pid>`, SLURM and systemd do to the main process
        _, err = child.communicate(timeout=300)
    assert child.returncode == 128 + signum  # never 0: a stopped run is not finished
    line = _one_line(err)
    command = f"ftlab fit --config base.yaml {' '.join(LONG)} --trainer.logger.init_args.name={name} {' '.join(slow)}"
    assert line.startswith(f"ftlab: interrupted by {signal.Signals(signum).name} at step "), line
    assert line.endswith(f". Last intact checkpoint: {last.relative_to(root)}; resume: {command} --ckpt_path last")
    for _ in range(100):  # the loader workers ended with their process, none left behind
        try:
            os.killpg(child.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"processes of {name}'s group still run after it ended")
    assert _ckpt(last)["epoch"] == 0  # stopped before the end
    assert _fingerprint(world["prior"]) == before  # the prior run's checkpoints: untouched

    resumed = ftlab(root, *shlex.split(line.split("; resume: ")[1])[1:])  # the command the line gives
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr
    final = _ckpt(last)
    assert (final["epoch"], final["global_step"]) == (1, 12)  # the remaining epoch, in the same run folder
    assert [p.name for p in (root / "runs" / name).iterdir()] == ["version_0"]
    assert _fingerprint(world["prior"]) == before


@pytest.mark.slow
def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_leaves_the_last_intact_one(
    world: dict[str, Any],
) -> None:
    root, name = world["root"], "full_disk"
    before = _fingerprint(world["prior"])
    full = inject(root, "full", "tests.helpers.faults.FullDisk", epoch=1, only="last")  # ENOSPC writing last.ckpt
    fit = ["fit", "--config", "base.yaml", *QUIET, f"--trainer.logger.init_args.name={name}", *full]
    run = ftlab(root, *fit, "--trainer.max_epochs=3", "--trainer.limit_train_batches=2", *SHORT[2:])
    assert run.returncode == 74, run.stderr[-3000:]  # EX_IOERR: free space, then resume
    line = _one_line(run.stderr)
    checkpoints = root / "runs" / name / "version_0" / "checkpoints"
    assert line.startswith(
        f"ftlab: error: cannot write checkpoint {checkpoints.relative_to(root)}/last.ckpt: No space left on device "
        "(ENOSPC); nothing half-written was left. Last intact checkpoint: "
    ), line
    intact = root / line.split("Last intact checkpoint: ")[1].split(";")[0]
    assert intact.parent == checkpoints and _ckpt(intact)["epoch"] in (0, 1)  # loads: whole
    assert _ckpt(checkpoints / "last.ckpt")["epoch"] == 0  # the previous last.ckpt, whole
    assert [p.name for p in checkpoints.iterdir() if p.name.startswith(".")] == []  # no partial file left
    assert "free some space, then resume: ftlab fit --config base.yaml" in line
    assert _fingerprint(world["prior"]) == before


@pytest.mark.slow
@pytest.mark.parametrize("name", ["CUT_CKPT", "base.yaml", "A_FILE", "AB"])
def test_export_and_the_predictor_name_a_file_that_is_no_checkpoint_in_one_line(
    name: str, world: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """A truncated checkpoint, a YAML, a text file or a folder: scripts/export.py ends with status 2 and one line
    naming the file; `Predictor.from_checkpoint` raises the project's ConfigError naming it, never KeyError."""
    path = Path(world["places"].get(name) or world["root"] / name)
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from export import main as export_main
    finally:
        sys.path.pop(0)
    capsys.readouterr()
    assert export_main([str(path), "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith(f"export: error: checkpoint {path} "), err
    assert "a .ckpt file written by `ftlab fit`" in err and not out
    with pytest.raises(ConfigError, match=f"checkpoint {re.escape(str(path))} .*a .ckpt file written by `ftlab fit`"):
        Predictor.from_checkpoint(path)


def test_a_failed_command_leaves_no_empty_runs_folder(in_tmp: Path, capfd: pytest.CaptureFixture[str]) -> None:
    (in_tmp / "cut.ckpt").write_text("not a checkpoint")
    photo(5, (20, 20)).save(in_tmp / "new.jpg")
    predict = ["predict", *QUIET, "--data.init_args.predict_root=new.jpg", "--ckpt_path"]
    for ckpt, said in (("no/such.ckpt", "does not exist"), ("cut.ckpt", "cannot be read")):
        code, _, err = entry_point([*predict, ckpt], capfd)
        assert code == 2 and f"{ckpt} {said}" in err, err[-2000:]
    assert not (in_tmp / "runs").exists()


def test_a_pycache_folder_is_no_class(tmp_path: Path) -> None:
    _folder(tmp_path, {"a": 2, "b": 2, "__pycache__": 2, ".ipynb_checkpoints": 2})
    assert discover_classes(tmp_path) == ["a", "b"]
    assert len(folder_files(tmp_path, ["a", "b"]).paths) == 4


def test_the_predictor_takes_image_arrays_and_says_what_it_takes_otherwise(tmp_path: Path) -> None:
    model = FineTuneModule("scratch/simple_cnn", "none", num_classes=2, class_names=["a", "b"], image_size=16)
    predictor = Predictor(model)
    image = photo(4, (20, 12))
    (from_array,), (from_pil,) = predictor(np.asarray(image)), predictor(image)
    assert from_array.probabilities == from_pil.probabilities and from_array.source == "image 0"
    gray = predictor([np.asarray(image.convert("L"))])
    assert gray[0].label in ("a", "b")
    for bad, shown in ((np.zeros((3, 12, 20), np.uint8), "(3, 12, 20)"), (np.zeros((12, 20, 3)), "float64")):
        with pytest.raises(ConfigError, match=re.escape(shown) + ".*channels first"):
            predictor(bad)
    with pytest.raises(ConfigError, match=r"Predictor takes image files.*got int at position 0"):
        predictor([3])  # type: ignore[list-item]
