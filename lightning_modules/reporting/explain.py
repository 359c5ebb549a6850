"""Class activation maps: where in an image a class's score came from, computed by pytorch-grad-cam (`grad-cam` on
PyPI) at the layer the backbone's source names (`Backbone.cam_target`), drawn over the image.

The CAM pass runs the torch network from image to logits (`ImageClassifier`: backbone, then head), whatever ran the
prediction (ONNX Runtime, test-time augmentation, a head trained on cached features), with gradients on and the
model's own state (train/eval modes, `requires_grad`, gradients) put back afterwards (`explaining`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import nn
from typing_extensions import override

from datamodules.common import ConfigError, DataConfig, close_names
from lightning_modules.backbones.backbone import Backbone
from lightning_modules.backbones.stages import CamLayer

# `method` names -> pytorch-grad-cam's classes (the gradient-free EigenCAM and the many-pass ScoreCAM among them).
# pytorch-grad-cam brings OpenCV, scikit-learn and pandas: it is imported at the first map, not when `ftlab` starts
# (tests/lightning_modules/cli/test_startup.py).
METHODS: dict[str, str] = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "hirescam": "HiResCAM",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
    "eigengradcam": "EigenGradCAM",
    "scorecam": "ScoreCAM",
}


def check_method(method: str, key: str = "method") -> str:
    """`method` when it is one of `METHODS`; else a ConfigError naming `key`, a close name and the choices."""
    if method not in METHODS:
        close = close_names(method, list(METHODS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"{key} {method!r}: {hint}choose one of {list(METHODS)}")
    return method


class ImageClassifier(nn.Module):
    """Images -> logits through a backbone and a head: the plain module pytorch-grad-cam runs."""

    def __init__(self, backbone: Backbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (batch, classes) of normalised images (batch, channels, height, width)."""
        return self.head(self.backbone(x))


def reshape_for(layer: CamLayer) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """pytorch-grad-cam's `reshape_transform` for a layer's output layout: none for NCHW; NHWC to NCHW; a vision
    transformer's tokens, its prefix tokens dropped, to a square NCHW grid."""
    if layer.layout == "nchw":
        return None
    if layer.layout == "nhwc":
        return lambda x: x.permute(0, 3, 1, 2)

    def tokens_to_grid(x: torch.Tensor) -> torch.Tensor:
        patches = x[:, layer.prefix_tokens :, :]
        side = math.isqrt(patches.shape[1])
        return patches.reshape(x.shape[0], side, side, x.shape[2]).permute(0, 3, 1, 2)

    return tokens_to_grid


@contextmanager
def explaining(module: nn.Module) -> Iterator[None]:
    """A CAM pass's conditions without a lasting change to `module`: inside, eval mode, gradients on (inference
    mode off: the test and predict loops run under it) and no parameter requiring a gradient (the input does: the
    gradient reaches the target layer of a frozen backbone too, and no weight's gradient is computed); after, each
    submodule's mode, each parameter's `requires_grad` and `.grad` as they were (pytorch-grad-cam calls `eval()`
    and `zero_grad()` on the model it is given)."""
    modes = [(m, m.training) for m in module.modules()]
    params = [(p, p.requires_grad, p.grad) for p in module.parameters()]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            module.eval()
            for p, _, _ in params:
                p.requires_grad_(False)
            yield
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad, grad in params:
            p.requires_grad_(requires_grad)
            p.grad = grad


def class_activation_maps(
    backbone: Backbone, head: nn.Module, images: torch.Tensor, targets: Sequence[int], method: str = "gradcam"
) -> np.ndarray:
    """One map per image for its target class: (batch, height, width) float32 in [0, 1] over the model's input
    (`images`: normalised, as the model takes them). A ConfigError when the backbone has no spatial map."""
    layer_module, layer = backbone.cam_target()
    classifier = ImageClassifier(backbone, head)
    device = next(classifier.parameters()).device
    import pytorch_grad_cam  # at the first map (METHODS)
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with explaining(classifier):
        x = images.detach().clone().float().to(device).requires_grad_(True)  # a clone outside inference mode
        method_class = getattr(pytorch_grad_cam, METHODS[check_method(method)])
        cam = method_class(classifier, [layer_module], reshape_transform=reshape_for(layer))
        try:
            maps = cam(x, [ClassifierOutputTarget(int(t)) for t in targets])
        finally:
            cam.activations_and_grads.release()  # pytorch-grad-cam's hooks off our modules
    return np.nan_to_num(np.asarray(maps, dtype=np.float32)).clip(0, 1)


def rgb_array(image: Image.Image | torch.Tensor) -> np.ndarray:
    """A decoded image (PIL, or a (channels, H, W) uint8 tensor) as (H, W, 3) float32 in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    pixels = image.detach().cpu()
    pixels = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
    pixels = pixels[:3] if pixels.shape[0] >= 3 else pixels[:1].expand(3, -1, -1)
    return pixels.permute(1, 2, 0).clamp(0, 1).numpy()


def source_coordinates(
    transform: Callable[[Any], torch.Tensor], config: DataConfig, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """For each row and each column of the model's input, the row and column of the (height, width) image it was
    sampled from: coordinate ramps pushed through `transform` itself (the eval transform: resize, crop, normalise),
    its normalisation undone. No resize or crop rule is re-derived here."""
    ramps = []
    for axis, size in ((0, height), (1, width)):
        ramp = (torch.arange(size, dtype=torch.float32) + 0.5) / size
        ramp = ramp.view(-1, 1).expand(height, width) if axis == 0 else ramp.view(1, -1).expand(height, width)
        out = transform(ramp.expand(3, height, width).contiguous()).float()
        values = out[0] * config.std[0] + config.mean[0]  # back to [0, 1]
        profile = values.mean(dim=1 - axis).double().numpy() * size - 0.5  # a row's (or column's) source
        # resizing and cropping are affine on each axis: a line through the middle half, away from the edges where
        # the antialiasing filter is clamped
        middle = np.arange(len(profile) // 4, max(len(profile) * 3 // 4, len(profile) // 4 + 2))
        slope, offset = np.polyfit(middle, profile[middle], 1)
        ramps.append(slope * np.arange(len(profile)) + offset)
    return ramps[0], ramps[1]


def to_image_size(
    cam: np.ndarray, transform: Callable[[Any], torch.Tensor], config: DataConfig, height: int, width: int
) -> np.ndarray:
    """A map over the model's input spread back over the (height, width) image it was made from (bilinear); 0 where
    the crop left the image out."""
    rows, cols = source_coordinates(transform, config, height, width)
    in_rows = np.interp(np.arange(height), rows, np.arange(len(rows)), left=-1, right=-1).astype(np.float32)
    in_cols = np.interp(np.arange(width), cols, np.arange(len(cols)), left=-1, right=-1).astype(np.float32)
    tensor = torch.from_numpy(cam)[None, None]
    # grid_sample's normalised coordinates: -1 and 1 are the centres of the first and last input pixels
    grid_y = torch.from_numpy(2 * in_rows / max(len(rows) - 1, 1) - 1).view(-1, 1).expand(height, width)
    grid_x = torch.from_numpy(2 * in_cols / max(len(cols) - 1, 1) - 1).view(1, -1).expand(height, width)
    grid = torch.stack([grid_x, grid_y], dim=-1)[None]
    inside = (torch.from_numpy(in_rows).view(-1, 1) >= 0) & (torch.from_numpy(in_cols).view(1, -1) >= 0)
    spread = nn.functional.grid_sample(tensor, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return (spread[0, 0] * inside).numpy().astype(np.float32)


def overlay(rgb: np.ndarray, heatmap: np.ndarray) -> Image.Image:
    """The heat map (jet) over the image, half each: pytorch-grad-cam's `show_cam_on_image`."""
    from pytorch_grad_cam.utils.image import show_cam_on_image  # at the first map (METHODS)

    return Image.fromarray(show_cam_on_image(rgb.astype(np.float32), heatmap, use_rgb=True, image_weight=0.5))


def explain_images(
    backbone: Backbone,
    head: nn.Module,
    inputs: torch.Tensor,
    raws: Sequence[Image.Image | torch.Tensor],
    targets: Sequence[int],
    transform: Callable[[Any], torch.Tensor],
    method: str = "gradcam",
) -> list[tuple[np.ndarray, Image.Image]]:
    """For each image: its heat map for its target class at the decoded image's own size (`raws`: the images
    `inputs` were made from by `transform`) and the map drawn over that image."""
    maps = class_activation_maps(backbone, head, inputs, targets, method)
    out = []
    for cam, raw in zip(maps, raws, strict=True):
        rgb = rgb_array(raw)
        heatmap = to_image_size(cam, transform, backbone.data_config, *rgb.shape[:2])
        out.append((heatmap, overlay(rgb, heatmap)))
    return out


class Candidate(NamedTuple):
    """A test image the CAM grid may show: the image in [0, 1] (3, H, W), its class, the predicted class, the
    prediction's probability and the runner-up class."""

    image: torch.Tensor
    target: int
    predicted: int
    confidence: float
    runner_up: int


class CamCandidates:
    """The test images of the report's CAM grid: the `k` most confident mistakes and the `k` least confident
    correct answers seen so far (each process keeps its own; `gathered` merges them)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.wrong: list[Candidate] = []
        self.right: list[Candidate] = []

    def add(self, images: torch.Tensor, probs: torch.Tensor, targets: torch.Tensor) -> None:
        """Consider a batch: images in [0, 1] as drawn, class probabilities (as predicted: TTA included), classes."""
        if not self.k or probs.shape[1] < 2:
            return
        top = probs.topk(2, dim=1)
        for i in range(len(targets)):
            conf, pred, second = float(top.values[i, 0]), int(top.indices[i, 0]), int(top.indices[i, 1])
            wrong = pred != int(targets[i])
            bucket = self.wrong if wrong else self.right
            rank = -conf if wrong else conf  # the first `k` by rank are kept
            if len(bucket) < self.k or rank < _rank(bucket[-1]):
                bucket.append(Candidate(images[i].detach().clone(), int(targets[i]), pred, conf, second))
                bucket.sort(key=_rank)
                del bucket[self.k :]

    def gathered(self, gather: Callable[[list[Any]], list[Any]]) -> tuple[list[Candidate], list[Candidate]]:
        """Every process's candidates through `gather` (a collective: every process calls it), the `k` of each
        kind kept: mistakes by falling confidence, correct answers by rising confidence."""
        parts = gather([(self.wrong, self.right)])
        wrong = sorted((c for w, _ in parts for c in w), key=_rank)[: self.k]
        right = sorted((c for _, r in parts for c in r), key=_rank)[: self.k]
        return wrong, right


def _rank(candidate: Candidate) -> float:
    return -candidate.confidence if candidate.predicted != candidate.target else candidate.confidence


def cam_panels(
    backbone: Backbone,
    head: nn.Module,
    candidates: Sequence[Candidate],
    class_names: Sequence[str],
    method: str = "gradcam",
) -> tuple[list[torch.Tensor], list[str], list[str]]:
    """Three panels per candidate (the image; its CAM for the predicted class; for the true class of a mistake, for
    the runner-up of a correct answer), with captions and caption colours: tiles for `figures.tiles_figure`."""
    config = backbone.data_config
    images = torch.stack([c.image for c in candidates])
    inputs = normalize(images, config.mean, config.std)[:, : config.input_size[0]]
    first = class_activation_maps(backbone, head, inputs, [c.predicted for c in candidates], method)
    others = [c.target if c.predicted != c.target else c.runner_up for c in candidates]
    second = class_activation_maps(backbone, head, inputs, others, method)
    tiles, captions, colors = [], [], []
    for c, cam_a, cam_b, other in zip(candidates, first, second, others, strict=True):
        rgb = c.image.permute(1, 2, 0).numpy()
        wrong = c.predicted != c.target
        said = f"{class_names[c.target]}, said {class_names[c.predicted]}" if wrong else class_names[c.target]
        tiles += [c.image, *(_tile(overlay(rgb, cam)) for cam in (cam_a, cam_b))]
        captions += [
            f"{said}\np={c.confidence:.2f}",
            f"CAM {class_names[c.predicted]}\n(predicted)",
            f"CAM {class_names[other]}\n({'true' if wrong else 'runner-up'})",
        ]
        colors += ["red" if wrong else "green", "black", "black"]
    return tiles, captions, colors


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Images in [0, 1] to the backbone's normalisation (the inverse of `figures.denormalize`; three channels)."""
    channels = images.shape[1]
    m = torch.tensor(list(mean) * (channels // len(mean) or 1))[:channels].view(1, -1, 1, 1)
    s = torch.tensor(list(std) * (channels // len(std) or 1))[:channels].view(1, -1, 1, 1)
    return (images.float() - m) / s


def _tile(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
