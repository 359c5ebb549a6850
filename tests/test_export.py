"""scripts/export.py: ONNX (with metadata), torch.export and a timm folder from a checkpoint, parity with the eager
model; timm `hf-hub:` and `local-dir:` backbone names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from datamodules.common import ConfigError
from lightning_modules.backbones.backbone import build_backbone, resolve_data_config
from lightning_modules.cli.main import cli_main
from lightning_modules.predictor import Predictor
from tests.helpers import REPO

pytestmark = pytest.mark.slow  # an export and a subprocess


def _max_gap(a: Any, b: torch.Tensor) -> float:
    return float(np.abs(np.asarray(a) - b.numpy()).max())


def test_export_parity_from_a_checkpoint(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fitted = cli_main(
        [
            "fit",
            "--config",
            "experiments/quickstart.yaml",
            "--model.image_size=32",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--data.init_args.num_workers=0",
        ]
    ).model.eval()  # one epoch: the best checkpoint holds these weights
    run = in_tmp / "runs" / "quickstart" / "version_0"
    ckpt = next((run / "checkpoints").glob("best-*.ckpt"))
    test = ["test", "--config", "experiments/quickstart.yaml", "--model.image_size=32", "--ckpt_path", "best"]
    cli_main([*test, "--trainer.limit_test_batches=2", "--trainer.enable_progress_bar=false"])
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from export import export
    finally:
        sys.path.pop(0)
    capsys.readouterr()
    diffs = export(ckpt, in_tmp / "out", batch_size=4, repo_id="me/digits-lite0")  # traced on a batch of 4
    assert set(diffs) == {"onnx", "torch.export", "timm local-dir"}
    closed = capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]  # the progress line as it closed
    assert closed.startswith("export: 100%") and "3/3 [" in closed and closed.endswith(", timm/]"), closed
    assert (in_tmp / "out" / "model.onnx").stat().st_size > 1_000_000

    import onnxruntime as ort
    import timm

    # the files against the model as fit left it in memory, on batches of other sizes (the batch is dynamic)
    session = ort.InferenceSession(str(in_tmp / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    program = torch.export.load(str(in_tmp / "out" / "model.pt2")).module()
    folder: Any = timm.create_model(f"local-dir:{in_tmp / 'out' / 'timm'}", pretrained=True).eval()
    for size in (1, 7):
        x = torch.rand(size, 3, 32, 32, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            reference = fitted(x)
            assert _max_gap(session.run(None, {"images": x.numpy()})[0], reference) < 1e-4  # Lite0 and its head
            assert _max_gap(program(x), reference) < 1e-4
            assert _max_gap(folder(x), reference) < 1e-5
            assert reference.shape == (size, 10) and reference.abs().max() > 1e-3  # not a constant zero

    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == [str(d) for d in range(10)]
    assert meta["output"] == "logits" and meta["backbone"] == "timm/tf_efficientnet_lite0"
    assert json.loads(meta["input_size"]) == [3, 32, 32] and json.loads(meta["interpolation"]) == "bicubic"
    assert len(json.loads(meta["mean"])) == 3 and json.loads(meta["crop_mode"]) == "center"
    # the timm folder: label names and preprocessing in its config, and ftlab takes it as a backbone
    assert folder.pretrained_cfg["label_names"] == [str(d) for d in range(10)]
    assert tuple(folder.pretrained_cfg["input_size"]) == (3, 32, 32)
    assert_model_card(in_tmp / "out" / "timm", json.loads((run / "metrics.json").read_text()))
    again = resolve_data_config(f"timm/local-dir:{in_tmp / 'out' / 'timm'}", "pretrained")
    assert again == resolve_data_config("timm/tf_efficientnet_lite0", "embedded", 32)

    # the Python API reads the timm folder as it reads the checkpoint: same classes, same probabilities
    photos = [Image.fromarray(np.uint8(np.random.default_rng(k).integers(0, 256, (40, 48, 3)))) for k in range(3)]
    from_folder = Predictor.from_timm_folder(in_tmp / "out" / "timm")(photos)
    from_checkpoint = Predictor.from_checkpoint(ckpt)(photos)
    for a, b in zip(from_folder, from_checkpoint, strict=True):
        assert a.label == b.label and a.probabilities == pytest.approx(b.probabilities, abs=1e-5)

    export(ckpt, in_tmp / "soft", softmax=True, shown=False)
    assert "export:" not in capsys.readouterr().err
    session = ort.InferenceSession(str(in_tmp / "soft" / "model.onnx"))
    assert session.get_modelmeta().custom_metadata_map["output"] == "probabilities"
    assert session.get_outputs()[0].name == "probabilities"
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert _max_gap(session.run(None, {"images": x.numpy()})[0], fitted(x).softmax(1)) < 1e-5


def assert_model_card(folder: Path, report: dict[str, Any]) -> None:
    """README.md in the Hub's format: its metadata block, the run's test accuracy in it and in the text, the figures
    it shows beside it, how to load it; every file readable by others."""
    text = (folder / "README.md").read_text()
    _, block, body = text.split("---\n", 2)
    meta = yaml.safe_load(block)
    assert meta["library_name"] == "timm" and meta["pipeline_tag"] == "image-classification"
    assert {"image-classification", "timm", "finetune-lab"} <= set(meta["tags"])
    (result,) = meta["model-index"][0]["results"]
    assert meta["model-index"][0]["name"] == "me/digits-lite0" and result["dataset"]["split"] == "test"
    metrics = {m["type"]: m["value"] for m in result["metrics"]}
    assert metrics["accuracy"] == round(report["acc"], 4) and metrics["f1"] == round(report["f1"], 4)
    assert f"| acc | {report['acc']:.4f} |" in body and "DigitsDataModule (local data)" in body
    assert (
        'timm.create_model("hf-hub:me/digits-lite0", pretrained=True)' in body and "hf upload me/digits-lite0" in body
    )
    assert "FreezeUnfreeze" in body and "interpolation" in body  # the recipe, the preprocessing
    for figure in ("confusion_matrix.png", "pr_curves.png", "learning_curves.png"):
        assert f"]({figure})" in body and (folder / figure).is_file()
    assert {oct(f.stat().st_mode & 0o777) for f in folder.iterdir()} == {"0o644"}


def test_timm_hub_and_folder_names_that_cannot_be_read_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"hf download timm/not_in_the_cache .*timm/local-dir:<folder>"):
        build_backbone("timm/hf-hub:timm/not_in_the_cache", "pretrained")  # HF_HUB_OFFLINE in conftest
    with pytest.raises(ConfigError, match=r"no readable config.json in .*empty"):
        build_backbone(f"timm/local-dir:{tmp_path / 'empty'}", "pretrained")


def test_export_missing_checkpoint_is_a_clear_error(in_tmp: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "export.py"), "nowhere.ckpt"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "checkpoint nowhere.ckpt does not exist" in result.stderr and "Traceback" not in result.stderr
