"""Backbones: every family builds, reports stages and data config; weights load or fail by key name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from datamodules.common import ConfigError
from datamodules.transforms import eval_transform
from lightning_modules.backbones.backbone import Backbone, build_backbone, resolve_data_config
from lightning_modules.backbones.embedded import EMBEDDED, embedded_weights
from lightning_modules.module import FineTuneModule

FAMILIES = {
    "timm/test_resnet": ["stem", "layer1", "layer2", "layer3", "layer4"],
    "timm/test_vit": ["stem", *[f"blocks.{i}" for i in range(6)]],
    "timm/test_efficientnet": None,
    "torchvision/resnet18": ["stem", "layer1", "layer2", "layer3", "layer4"],
    "torchvision/mobilenet_v2": [f"features.{i}" for i in range(19)],
    "torchvision/mobilenet_v3_small": [*[f"features.{i}" for i in range(13)], "classifier.0"],
    "torchvision/efficientnet_b0": [f"features.{i}" for i in range(9)],
    "torchvision/vgg11": ["features.0", "features.3", "features.6", "features.11", "features.16", "classifier"],
    "torchvision/convnext_tiny": [*[f"features.{i}" for i in range(8)], "classifier.0"],
    "scratch/mlp": ["fc1", "fc2"],
    "scratch/simple_cnn": ["conv1", "conv2", "fc"],
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_builds_with_stages_and_data_config(name: str) -> None:
    size = 32 if name.startswith("scratch") else 64
    backbone = build_backbone(name, weights="none", image_size=size)
    expected = FAMILIES[name]
    if expected is not None:
        assert backbone.stage_names() == expected
    all_params = {n for n, _ in backbone.body.named_parameters()}
    assert {p for s in backbone.stages for p in s.params} == all_params
    assert backbone.data_config.input_size == (3, size, size)
    assert len(backbone.data_config.mean) == 3
    feats = backbone.eval()(torch.rand(2, 3, size, size))
    assert feats.shape == (2, backbone.num_features)


def test_torchvision_vit_stages_follow_encoder_layers() -> None:
    backbone = build_backbone("torchvision/vit_b_16", weights="none")
    names = backbone.stage_names()
    assert names[0] == "stem" and names[-1] == "encoder.ln"
    assert names[1:-1] == [f"encoder.layers.encoder_layer_{i}" for i in range(12)]
    assert "class_token" in backbone.stages[0].params


def test_data_config_comes_from_pretrained_preprocessing() -> None:
    lite = resolve_data_config("timm/efficientnet_lite0")
    assert (lite.input_size, lite.interpolation, lite.crop_pct) == ((3, 224, 224), "bicubic", 0.875)
    b1 = resolve_data_config("torchvision/efficientnet_b1", "IMAGENET1K_V2")
    assert b1.input_size == (3, 240, 240) and b1.crop_pct == pytest.approx(240 / 255) and b1.interpolation == "bilinear"
    gray = resolve_data_config("scratch/mlp", "none", image_size=28, in_chans=1)
    assert gray.input_size == (1, 28, 28) and gray.mean == (0.5,)


# ImageNet classes: 281-285 are the domestic cats (tabby, tiger cat, Persian, Siamese, Egyptian), 967 espresso
CATS, ESPRESSO = set(range(281, 286)), 967


def imagenet_top1(backbone: Backbone, head: dict[str, torch.Tensor], photo: Image.Image) -> int:
    """The ImageNet class the embedded classifier ranks first for a real photo, with the backbone's own
    preprocessing (resize, centre crop, mean and std of its data config)."""
    x = eval_transform(backbone.data_config)(photo)[None]
    with torch.no_grad():
        logits = backbone.eval()(x) @ head["classifier.weight"].T + head["classifier.bias"]
    return int(logits.argmax())


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(EMBEDDED))
def test_embedded_weights_load_into_their_tf_variant_and_name_real_photos(arch: str) -> None:
    """Each embedded weight file, loaded offline into timm's TF variant with mean = std = 0.5 at its native size,
    ranks a cat class first for skimage's photo of a cat and espresso first for its cup of coffee."""
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (dev extra) ships the real photos")
    state = embedded_weights(arch)
    backbone = build_backbone(f"timm/{arch}", weights="embedded")
    cfg = backbone.data_config
    assert cfg.mean == cfg.std == (0.5, 0.5, 0.5) and cfg.interpolation == "bicubic"
    assert cfg.input_size[1] == {"tf_efficientnet_lite0": 224, "tf_efficientnet_lite1": 240}.get(arch, 260)
    assert type(backbone.body.conv_stem).__name__ == "Conv2dSame"  # TF "same" padding
    body = backbone.body.state_dict()
    assert all(torch.equal(body[k], v) for k, v in state.items() if not k.startswith("classifier."))
    cat = Image.fromarray(skimage_data.chelsea())
    coffee = Image.fromarray(skimage_data.coffee())
    assert imagenet_top1(backbone, state, cat) in CATS
    assert imagenet_top1(backbone, state, coffee) == ESPRESSO


def test_embedded_weights_in_the_pytorch_padded_twin_warn() -> None:
    with pytest.warns(UserWarning, match="use model.backbone: timm/tf_efficientnet_lite0"):
        backbone = build_backbone("timm/efficientnet_lite0", weights="embedded", image_size=64)
    assert type(backbone.body.conv_stem).__name__ == "Conv2d"
    stem = embedded_weights("tf_efficientnet_lite0")["conv_stem.weight"]
    assert torch.equal(backbone.body.state_dict()["conv_stem.weight"], stem)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_file_loads(tmp_path: Path, suffix: str) -> None:
    source = build_backbone("timm/test_resnet", weights="none")
    state = {k: v.clone() for k, v in source.body.state_dict().items()}
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    loaded = build_backbone("timm/test_resnet", weights=str(path))
    for key, value in loaded.body.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_mismatched_weights_file_names_keys(tmp_path: Path) -> None:
    state = build_backbone("timm/test_resnet", weights="none").body.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["layer4.0.conv1.weight"]
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(
        ConfigError, match=r"missing keys \[layer4\.0\.conv1\.weight\].*unexpected keys \[extra\.weight\]"
    ):
        build_backbone("timm/test_resnet", weights=str(path))


def test_weights_file_that_is_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(ConfigError, match="does not hold a state dict"):
        build_backbone("timm/test_resnet", weights=str(path))


@pytest.mark.parametrize(
    ("name", "weights", "message"),
    [
        ("timm/resnet_18", "none", "timm has no model 'resnet_18'; close names"),
        ("torchvision/resnet_18", "none", "torchvision has no classification model"),
        ("keras/resnet18", "none", "must be <source>/<model>"),
        ("scratch/mlp", "pretrained", "has no pretrained weights"),
        ("timm/test_resnet", "embedded", "'embedded' exists only for timm/tf_efficientnet_lite0, timm/tf_eff"),
        ("timm/test_resnet", "missing/file.pth", "weights file missing/file.pth does not exist"),
        ("torchvision/resnet18", "IMAGENET1K_V9", "not a weights name of torchvision/resnet18"),
    ],
)
def test_bad_backbone_specs_fail_clearly(name: str, weights: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_backbone(name, weights=weights, image_size=32)


def test_stage_lookup_by_name_and_index() -> None:
    backbone = build_backbone("torchvision/resnet18", weights="none", image_size=32)
    assert backbone.stage("layer4") is backbone.stage(-1)
    with pytest.raises(ConfigError, match="has no stage 'layer5'"):
        backbone.stage("layer5")


def test_weights_with_another_classifier_load_and_wrong_shapes_are_named(tmp_path: Path) -> None:
    import timm

    full = timm.create_model("test_resnet", num_classes=5).state_dict()  # a fine-tuned 5-class model's file
    torch.save(full, tmp_path / "five.pth")
    loaded = build_backbone("timm/test_resnet", weights=str(tmp_path / "five.pth"))
    assert torch.equal(loaded.body.state_dict()["layer1.0.conv1.weight"], full["layer1.0.conv1.weight"])
    full["layer1.0.conv1.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(full, tmp_path / "bad_shape.pth")
    with pytest.raises(ConfigError, match=r"wrong shapes \[layer1\.0\.conv1\.weight \(1, 1, 1, 1\) !="):
        build_backbone("timm/test_resnet", weights=str(tmp_path / "bad_shape.pth"))


def test_torchvision_needs_three_channels() -> None:
    with pytest.raises(ConfigError, match=r"set model\.in_chans: 3"):
        build_backbone("torchvision/resnet18", weights="none", image_size=32, in_chans=1)


def test_offline_pretrained_download_says_where_to_put_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.request

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr("torch.hub.urlopen", offline)  # torch.hub imported its own name: no real request
    monkeypatch.setattr("torch.hub.get_dir", lambda: "/nonexistent/hub")
    with pytest.raises(ConfigError, match=r"resnet18-f37072fd\.pth .* into /nonexistent/hub/checkpoints"):
        build_backbone("torchvision/resnet18", weights="IMAGENET1K_V1", image_size=32)


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(EMBEDDED))
def test_each_embedded_backbone_fine_tunes_one_step(arch: str) -> None:
    """A FineTuneModule on each embedded backbone (at 64 px: the step, not the resolution, is under test) takes one
    optimizer step on two images: a finite loss, and every trainable tensor that had a gradient moved."""
    torch.manual_seed(0)
    model = FineTuneModule(backbone=f"timm/{arch}", weights="embedded", image_size=64, num_classes=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([0, 1]))
    loss.backward()
    optimizer.step()
    moved = [k for k, v in model.named_parameters() if v.grad is not None and not torch.equal(v, before[k])]
    assert torch.isfinite(loss) and len(moved) == sum(1 for v in model.parameters() if v.grad is not None) > 100
