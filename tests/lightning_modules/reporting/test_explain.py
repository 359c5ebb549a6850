"""Class activation maps: the layer each backbone source names, the map of a fitted model on the patch that decides
its class, the ImageNet Lite0 on a real cat, the map at the image's own size, the model left as it was."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image

from datamodules.common import ConfigError
from lightning_modules.backbones.backbone import build_backbone
from lightning_modules.backbones.embedded import embedded_weights
from lightning_modules.backbones.stages import CamLayer
from lightning_modules.module import FineTuneModule
from lightning_modules.predictor import Predictor
from lightning_modules.reporting.explain import CamCandidates

SIZE, PATCH = 48, 16  # the patch set: 48 px noise, a 16 px patch (a uniform map puts 11% of its mass there)
COLOURS = ((220, 30, 30), (30, 30, 220))  # class 0: a red patch, class 1: a blue one


@pytest.mark.parametrize(
    ("backbone", "layer"),
    [
        ("timm/test_resnet", CamLayer("layer4")),
        ("timm/test_efficientnet", CamLayer("blocks.4")),
        ("timm/test_vit", CamLayer("blocks.5", "tokens", 1)),
        ("torchvision/resnet18", CamLayer("layer4")),
        ("scratch/simple_cnn", CamLayer("conv2")),
    ],
)
def test_each_source_names_the_last_spatial_stage(backbone: str, layer: CamLayer) -> None:
    built = build_backbone(backbone, "none", image_size=32 if backbone != "timm/test_vit" else None)
    module, named = built.cam_target()
    assert named == layer and module is built.body.get_submodule(layer.module)


def test_a_backbone_without_a_spatial_map_says_so_in_one_line() -> None:
    model = FineTuneModule("scratch/mlp", "none", num_classes=2)
    with pytest.raises(ConfigError, match=r"^backbone scratch/mlp has no spatial feature map") as err:
        Predictor(model).explain(Image.new("RGB", (40, 30)))
    assert "\n" not in str(err.value)


def test_the_map_covers_the_image_at_its_size_and_the_model_is_left_as_it_was() -> None:
    """A 70 x 50 photo, its 32 px centre crop (of 45 x 32): the map is 50 x 70 in [0, 1], zero outside the columns
    the crop kept; a frozen backbone still gets its map, and modes, `requires_grad` and gradients are as they were."""
    torch.manual_seed(0)
    model = FineTuneModule("scratch/simple_cnn", "none", image_size=32, num_classes=3)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    last: torch.nn.Linear = model.head[-1]  # type: ignore[assignment]
    last.weight.grad = torch.ones_like(last.weight)
    predictor = Predictor(model)
    model.head.train()  # a mode of its own, to be found again
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    (explained,) = predictor.explain(image, target="2")
    heatmap = explained.heatmap
    assert heatmap is not None and heatmap.shape == (50, 70) and heatmap.dtype == np.float32
    assert heatmap.min() >= 0 and heatmap.max() <= 1 and heatmap.max() > 0
    assert explained.overlay is not None and explained.overlay.size == (70, 50) and explained.label == "2"
    assert not heatmap[:, :8].any() and not heatmap[:, -8:].any()  # cropped away: 0
    assert all(m.training for m in model.head.modules()) and not any(m.training for m in model.backbone.modules())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters()) and last.weight.grad is not None
    assert bool((last.weight.grad == 1).all())


def test_the_grid_keeps_the_surest_mistakes_and_the_least_sure_right_answers() -> None:
    candidates = CamCandidates(2)
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55], [0.3, 0.7], [0.99, 0.01]])
    targets = torch.tensor([1, 1, 0, 1, 1, 0])
    candidates.add(torch.zeros(6, 3, 4, 4), probs, targets)
    wrong, right = candidates.gathered(lambda items: items)
    assert [c.confidence for c in wrong] == pytest.approx([0.9, 0.8])
    assert [c.confidence for c in right] == pytest.approx([0.55, 0.7]) and right[0].runner_up == 0
    off = CamCandidates(0)
    off.add(torch.zeros(6, 3, 4, 4), probs, targets)
    assert off.gathered(lambda items: items) == ([], [])


def _patch_images(n: int, seed: int) -> tuple[list[Image.Image], list[int], list[tuple[int, int]]]:
    """Grey noise with one coloured patch at a random place: its colour is the class."""
    rng = np.random.default_rng(seed)
    images, labels, corners = [], [], []
    for _ in range(n):
        pixels = np.repeat(rng.integers(40, 216, (SIZE, SIZE, 1)), 3, axis=2).astype(np.uint8)
        label, (top, left) = int(rng.integers(2)), rng.integers(0, SIZE - PATCH + 1, 2)
        pixels[top : top + PATCH, left : left + PATCH] = COLOURS[label]
        images.append(Image.fromarray(pixels))
        labels.append(label)
        corners.append((int(top), int(left)))
    return images, labels, corners


def _mass_in_patch(heatmap: np.ndarray, corner: tuple[int, int]) -> float:
    top, left = corner
    return float(heatmap[top : top + PATCH, left : left + PATCH].sum() / heatmap.sum())


@pytest.fixture(scope="module")
def patch_model() -> FineTuneModule:
    """The from-scratch CNN fitted for three epochs on 256 patch images (seconds)."""
    torch.manual_seed(0)
    model = FineTuneModule("scratch/simple_cnn", "none", image_size=SIZE, num_classes=2)
    transform = Predictor(model).transform
    images, labels, _ = _patch_images(256, seed=0)
    x, y = torch.stack([transform(i) for i in images]), torch.tensor(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(3):
        for batch in torch.randperm(len(x)).split(32):
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval()


@pytest.mark.slow
def test_the_map_finds_the_patch_that_decides_the_class(patch_model: FineTuneModule) -> None:
    """On new images, the map of the predicted class puts at least 60% of its mass in the patch (a uniform map:
    11%); from the wrong layer (the flattened features before the dense layer) there is no map at all."""
    images, labels, corners = _patch_images(16, seed=1)
    predictor = Predictor(patch_model)
    explained = predictor.explain(images)
    assert [e.label for e in explained] == [str(label) for label in labels]  # the fit learnt the patch
    masses = [_mass_in_patch(e.heatmap, c) for e, c in zip(explained, corners, strict=True)]  # type: ignore[arg-type]
    assert np.median(masses) >= 0.6 and min(masses) > 2 * (PATCH / SIZE) ** 2, masses
    patch_model.backbone.cam_layer = CamLayer("fc.0")  # the flattening: no spatial map
    try:
        with pytest.raises(ValueError, match=r"Invalid .*shape"):
            predictor.explain(images[:1])
    finally:
        patch_model.backbone.cam_layer = CamLayer("conv2")


@pytest.mark.slow
def test_the_imagenet_lite0_looks_at_the_cat() -> None:
    """The embedded Lite0 with its untouched ImageNet head on skimage's `chelsea`: a cat class, and the map of that
    class peaks on the cat's head (a box marked by hand on the 451 x 300 photo), not on the background."""
    model = FineTuneModule("timm/tf_efficientnet_lite0", "embedded", num_classes=1000)
    weights = embedded_weights("tf_efficientnet_lite0")
    model.head[-1].load_state_dict({"weight": weights["classifier.weight"], "bias": weights["classifier.bias"]})
    (explained,) = Predictor(model).explain(Image.fromarray(skimage.data.chelsea()))
    assert explained.label in {str(k) for k in range(281, 286)}  # ImageNet's domestic cats
    assert explained.heatmap is not None and explained.heatmap.shape == (300, 451)
    row, col = np.unravel_index(explained.heatmap.argmax(), explained.heatmap.shape)
    head = (30, 300, 60, 360)  # rows and columns of the head: ears to chin, left cheek to right eye
    assert head[0] <= row < head[1] and head[2] <= col < head[3], (row, col)
