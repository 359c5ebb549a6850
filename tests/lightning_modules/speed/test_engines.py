"""The frozen-pass engines: ONNX Runtime against torch on a tiny timm model, the fallbacks, the export cache."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

from datamodules import DigitsDataModule
from datamodules.common import ConfigError
from lightning_modules.backbones.backbone import build_backbone, data_config_dict
from lightning_modules.module import FineTuneModule
from lightning_modules.speed import engines
from lightning_modules.speed.engines import frozen_pass, onnx_key, torch_pass
from lightning_modules.speed.feature_cache import FeatureCache, compute_features
from tests.helpers.models import quiet_trainer

pytest.importorskip("onnxruntime")
BACKBONE = "timm/test_resnet"
CPU = torch.device("cpu")


def _backbone(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_backbone(BACKBONE, "none", 32, 3).eval()


def _loader() -> torch.utils.data.DataLoader:
    data = DigitsDataModule(
        batch_size=64, num_workers=0, augment="none", data_config=data_config_dict(BACKBONE, "none", 32)
    )
    data.setup("fit")
    return data.loader("val", data.datasets["val"])


@pytest.mark.slow
def test_onnxruntime_features_equal_torch_within_the_tolerance(tmp_path: Path) -> None:
    backbone = _backbone()
    by_torch = compute_features(backbone, _loader(), CPU, "torch", tmp_path)
    by_ort = compute_features(backbone, _loader(), CPU, "onnxruntime", tmp_path)
    assert len(list(tmp_path.glob("*.onnx"))) == 1  # exported once, kept
    assert by_ort.features.shape == by_torch.features.shape == (144, backbone.num_features)
    assert torch.equal(by_ort.targets, by_torch.targets)
    assert float((by_ort.features - by_torch.features).abs().max()) <= 1e-4
    assert not torch.equal(by_ort.features, by_torch.features)  # really another engine, not torch twice


@pytest.mark.slow
def test_the_export_is_cached_under_its_weights_and_input(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    x = torch.rand(4, 3, 32, 32)
    backbone = _backbone()
    key = onnx_key(backbone, x)
    assert key == onnx_key(_backbone(), x)  # the same weights: the same file
    assert key != onnx_key(_backbone(seed=1), x)  # other weights
    assert key != onnx_key(backbone, torch.rand(4, 3, 40, 40))  # another input size
    frozen_pass(backbone, CPU, "onnxruntime", x, tmp_path)
    assert "[torch.onnx]" not in capfd.readouterr().out  # the exporter's step lines would break the progress line
    (path,) = tmp_path.glob("*.onnx")
    stamp = path.stat().st_mtime_ns
    frozen_pass(backbone, CPU, "onnxruntime", x, tmp_path)
    assert path.stat().st_mtime_ns == stamp  # reused, not exported again


def test_falls_back_to_torch_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    x = torch.rand(4, 3, 32, 32)
    backbone = _backbone()
    expected = torch_pass(backbone, CPU)(x)
    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, logger="ftlab"):
        patch.setattr(engines, "TOLERANCE", -1.0)  # any difference fails the check
        run = frozen_pass(backbone, CPU, "onnxruntime", x, tmp_path)
        assert torch.equal(run(x), expected)
    assert "ONNX Runtime differs from torch by" in caplog.text
    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, logger="ftlab"):
        patch.setitem(sys.modules, "onnxruntime", None)  # not installed
        assert torch.equal(frozen_pass(backbone, CPU, "onnxruntime", x, tmp_path / "none")(x), expected)
        assert "ONNX Runtime not used (ModuleNotFoundError" in caplog.text


@pytest.mark.parametrize(
    ("backbone", "device", "images", "installed", "engine", "why"),
    [
        ("timm/tf_efficientnet_lite0", "cpu", None, True, "onnxruntime", "4.1x torch on tf_efficientnet here"),
        ("timm/efficientnet_b1", "cpu", None, True, "onnxruntime", "3.8x torch on efficientnet"),
        ("torchvision/mobilenet_v2", "cpu", 5000, True, "onnxruntime", "4x torch on mobilenet"),
        ("torchvision/resnet18", "cpu", None, True, "onnxruntime", "1.5x torch on resnet"),
        ("timm/hf-hub:timm/resnet50.a1_in1k", "cpu", None, True, "onnxruntime", "on resnet"),
        ("timm/tf_efficientnet_lite0", "cuda", None, True, "torch", "cuda: torch"),
        ("timm/vit_small_patch16_224", "cpu", None, True, "torch", "not measured on this family"),
        ("scratch/simple_cnn", "cpu", None, True, "torch", "not measured on this family"),
        ("timm/tf_efficientnet_lite0", "cpu", None, False, "torch", "onnxruntime is not installed"),
        ("timm/tf_efficientnet_lite0", "cpu", 200, True, "torch", "200 images do not pay for a model export"),
    ],
)
def test_auto_picks_by_family_device_and_size(
    monkeypatch: pytest.MonkeyPatch,
    backbone: str,
    device: str,
    images: int | None,
    installed: bool,
    engine: str,
    why: str,
) -> None:
    """The rule `auto` follows (docs/performance.md), GPU included, without a GPU: a function of the name, the device
    and the pass's size, never of a timing."""
    if not installed:
        monkeypatch.setattr(engines.importlib.util, "find_spec", lambda name: None)
    picked, reason = engines.auto_engine(backbone, torch.device(device), images)
    assert (picked, why in reason) == (engine, True), reason


def test_auto_says_its_choice_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ftlab"):
        for _ in range(3):
            assert engines.chosen_engine("auto", "timm/vit_tiny_patch16_224", CPU, "feature pass") == "torch"
        assert engines.chosen_engine("onnxruntime", "timm/vit_tiny_patch16_224", CPU, "feature pass") == "onnxruntime"
    assert caplog.text.count("feature pass: engine auto -> torch (timm/vit_tiny_patch16_224: ONNX Runtime not") == 1


def test_an_unknown_engine_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"feature_cache.engine 'tensorrt': choose one of \['torch'"):
        FeatureCache(engine="tensorrt")


def test_test_and_predict_give_the_same_results_on_either_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("lightning_modules.module.ONNX_DIR", tmp_path)
    config = data_config_dict(BACKBONE, "none", 32)
    results = {}
    for engine in ("torch", "onnxruntime"):
        torch.manual_seed(0)
        model = FineTuneModule(
            backbone=BACKBONE, weights="none", image_size=32, num_classes=10, inference_engine=engine
        )
        data = DigitsDataModule(batch_size=64, num_workers=0, augment="none", data_config=config)
        trainer = quiet_trainer(tmp_path, limit_test_batches=2, limit_predict_batches=2)
        tested = trainer.test(model, datamodule=data, verbose=False)[0]
        probs = torch.cat(trainer.predict(model, datamodule=data))  # type: ignore[arg-type]
        results[engine] = (tested, probs, model._inference)
    (torch_metrics, torch_probs, _), (ort_metrics, ort_probs, ort_pass) = results["torch"], results["onnxruntime"]
    assert ort_pass is not None and len(list(tmp_path.glob("*.onnx"))) == 1  # the model really ran on ORT
    assert float((ort_probs - torch_probs).abs().max()) <= 1e-4 and not torch.equal(ort_probs, torch_probs)
    assert ort_metrics["test/acc"] == torch_metrics["test/acc"]
    assert ort_metrics["test/loss"] == pytest.approx(torch_metrics["test/loss"], abs=1e-4)
