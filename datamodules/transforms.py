"""Transforms built from a backbone's data config: evaluation preprocessing and training augmentation presets.

Size, mean, std, interpolation and crop always come from the data config (the backbone's pretrained
preprocessing); nothing here is typed per dataset.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision import transforms
from torchvision.transforms import InterpolationMode, v2
from typing_extensions import override

from datamodules.common import ConfigError, DataConfig

AUGMENT_PRESETS = ("none", "basic", "affine", "notebook", "randaugment", "trivialaugment")
# Images whose shorter side is at most this many pixels (CIFAR 32, MNIST 28, the digits 8) are "small": random crops
# take them whole and shift them (the CIFAR standard) instead of zooming into a patch of them.
SMALL_IMAGE = 64
# The smallest part of a photo RandomResizedCrop keeps when fine-tuning (torchvision's default, 0.08, is
# ImageNet-from-scratch; measured on the dev cats vs dogs photos: see docs/augmentation.md).
CROP_SCALE = (0.35, 1.0)


class ToChannels(torch.nn.Module):
    """Make an image tensor have `channels` channels: repeat grayscale, drop alpha, or average RGB to gray."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    @override
    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """(C, H, W) -> (channels, H, W)."""
        c = img.shape[-3]
        if c == self.channels:
            return img
        if c == 4:
            img, c = img[..., :3, :, :], 3
        if c == 1:
            return img.expand(*img.shape[:-3], self.channels, *img.shape[-2:]).contiguous()
        if self.channels == 1:
            return v2.functional.rgb_to_grayscale(img)
        return img


class Normalize(torch.nn.Module):
    """uint8 (or [0, 1] float) image -> float32 `(x / 255 - mean) / std` in one pass (torchvision's ToDtype then
    Normalize make two full-size float copies; this is most of the cost after decoding and resizing)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.shift = torch.tensor([m * 255.0 for m in mean]).view(-1, 1, 1)
        self.scale = torch.tensor([1.0 / (s * 255.0) for s in std]).view(-1, 1, 1)

    @override
    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """(C, H, W) uint8 or float in [0, 1] -> normalised float32 (a plain tensor)."""
        x = img.as_subclass(torch.Tensor)
        x = x.to(torch.float32) if x.dtype == torch.uint8 else x.to(torch.float32) * 255.0
        return x.sub_(self.shift).mul_(self.scale)

    @override
    def extra_repr(self) -> str:
        """Mean and std, so the transform's repr (a feature-cache key) changes with them."""
        return f"shift={self.shift.flatten().tolist()}, scale={self.scale.flatten().tolist()}"


def _interpolation(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(name)
    except ValueError:
        raise ConfigError(f"unknown interpolation {name!r}; use bilinear, bicubic or nearest") from None


def _to_image(cfg: DataConfig) -> list[Any]:
    """First in every pipeline: a PIL image or a decoded tensor to an image tensor of the model's channel count."""
    return [v2.ToImage(), ToChannels(cfg.input_size[0])]


def _normalize(cfg: DataConfig) -> list[Any]:
    """Last in every pipeline: to float in [0, 1], then the backbone's mean and std."""
    return [Normalize(cfg.mean, cfg.std)]


def _resize_crop(cfg: DataConfig) -> list[Any]:
    """timm's own evaluation resize and crop for the config's `crop_mode` (center, squash or border) and
    `crop_pct`, called rather than re-derived, then to an image tensor (its normalisation is left to `Normalize`).

    Images arrive as tensors (`ToImage` first, in training and evaluation alike, so that both resize with the
    same kernel: PIL's bicubic and torch's differ, visibly on upsampled 8 px digits). `border` pads with the
    mean colour per channel, which timm does on PIL images only: it goes through PIL.
    """
    from timm.data.transforms import MaybePILToTensor  # timm imports all its models: when a pipeline is built
    from timm.data.transforms_factory import transforms_imagenet_eval

    _interpolation(cfg.interpolation)  # an unknown name: our error, not timm's KeyError
    height, width = cfg.input_size[1:]
    steps = transforms_imagenet_eval(
        img_size=height if height == width else (height, width),
        crop_pct=cfg.crop_pct,
        crop_mode=cfg.crop_mode,
        interpolation=cfg.interpolation,
        mean=cfg.mean,  # border's fill colour
        std=cfg.std,
        normalize=False,
    ).transforms
    steps = [_as_v2(t) for t in steps if not isinstance(t, MaybePILToTensor)]
    to_pil = [v2.ToPILImage()] if cfg.crop_mode == "border" else []
    return [*to_pil, *steps, v2.ToImage()]


def _as_v2(step: Any) -> Any:
    """timm's torchvision (v1) Resize and CenterCrop as their v2 equals: the same geometry, but uint8 tensors are
    resized by v2's uint8 kernel (faster, and what this pipeline measured and trained with) instead of a float
    round trip that moves pixels by a level."""
    if isinstance(step, transforms.Resize):
        return v2.Resize(step.size, interpolation=step.interpolation, max_size=step.max_size, antialias=True)
    if isinstance(step, transforms.CenterCrop):
        return v2.CenterCrop(step.size)
    return step


class RandomCrop(torch.nn.Module):
    """The `basic` crop, chosen by the size of each source image.

    Small images (shorter side <= `SMALL_IMAGE` px) are resized and center-cropped to `size` as for evaluation,
    then shifted: a random `size` crop of the image zero-padded by `size // 8` on each side (4 px at 32 px, the CIFAR
    standard). Larger images get a RandomResizedCrop keeping `scale` of the area (at least 35% by default).
    """

    def __init__(self, data_config: DataConfig, scale: tuple[float, float] = CROP_SCALE) -> None:
        super().__init__()
        size = data_config.input_size[1]
        self.small = v2.Compose([*_resize_crop(data_config), v2.RandomCrop(size, padding=max(1, size // 8))])
        interp = _interpolation(data_config.interpolation)
        self.large = v2.RandomResizedCrop(size, scale=scale, interpolation=interp, antialias=True)

    @override
    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """(C, H, W) image of any size -> (C, size, size)."""
        return self.small(img) if min(img.shape[-2:]) <= SMALL_IMAGE else self.large(img)


def eval_transform(data_config: DataConfig) -> v2.Compose:
    """timm's eval pipeline: resize and crop by `crop_mode` and `crop_pct`, scale to [0, 1] and normalise."""
    return v2.Compose(_to_image(data_config) + _resize_crop(data_config) + _normalize(data_config))


def train_transform(data_config: DataConfig, augment: str = "basic", crop_scale: float = CROP_SCALE[0]) -> v2.Compose:
    """Training pipeline for an augmentation preset (`AUGMENT_PRESETS`); `crop_scale` is the smallest part of a
    large image's area that the random crops of `basic`, `randaugment` and `trivialaugment` keep."""
    if augment == "none":
        return eval_transform(data_config)
    if not 0 < crop_scale <= 1:
        raise ConfigError(f"data.init_args.crop_scale must be in (0, 1], got {crop_scale}")
    size = data_config.input_size[1]
    interp = _interpolation(data_config.interpolation)
    crop = RandomCrop(data_config, scale=(crop_scale, 1.0))
    # RandAugment's rotations and shears on tensors take nearest or bilinear only (bicubic raises, e.g. for timm's
    # EfficientNets): bilinear there, the backbone's own interpolation for every resize
    geometric = (
        interp if interp in (InterpolationMode.NEAREST, InterpolationMode.BILINEAR) else InterpolationMode.BILINEAR
    )
    presets: dict[str, list[Any]] = {
        "basic": [crop, v2.RandomHorizontalFlip()],
        # small shifts, turns and zooms, no flip: for digits, characters and other orientation-bound images
        "affine": [*_resize_crop(data_config), v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))],
        "notebook": [
            v2.RandomResizedCrop(size, scale=(0.8, 1.0), interpolation=interp, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomRotation(10),
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3),
        ],
        "randaugment": [crop, v2.RandomHorizontalFlip(), v2.RandAugment(interpolation=geometric)],
        "trivialaugment": [crop, v2.RandomHorizontalFlip(), v2.TrivialAugmentWide(interpolation=geometric)],
    }
    if augment not in presets:
        raise ConfigError(f"data.augment {augment!r} is not a preset; choose one of {list(AUGMENT_PRESETS)}")
    return v2.Compose(_to_image(data_config) + presets[augment] + _normalize(data_config))
