"""Transforms built from a backbone's data config: evaluation preprocessing and training augmentation presets.

Size, mean, std, interpolation and crop always come from the data config (the backbone's pretrained
preprocessing); nothing here is typed per dataset.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import InterpolationMode, v2

from lightning_modules.backbones import DataConfig
from lightning_modules.errors import ConfigError

AUGMENT_PRESETS = ("none", "basic", "affine", "notebook", "randaugment", "trivialaugment")


class ToChannels(torch.nn.Module):
    """Make an image tensor have `channels` channels: repeat grayscale, drop alpha, or average RGB to gray."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

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

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """(C, H, W) uint8 or float in [0, 1] -> normalised float32 (a plain tensor)."""
        x = img.as_subclass(torch.Tensor)
        x = x.to(torch.float32) if x.dtype == torch.uint8 else x.to(torch.float32) * 255.0
        return x.sub_(self.shift).mul_(self.scale)

    def extra_repr(self) -> str:
        """Mean and std, so the transform's repr (a feature-cache key) changes with them."""
        return f"shift={self.shift.flatten().tolist()}, scale={self.scale.flatten().tolist()}"


def _interpolation(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(name)
    except ValueError:
        raise ConfigError(f"unknown interpolation {name!r}; use bilinear, bicubic or nearest") from None


def _head(cfg: DataConfig) -> list[Any]:
    return [v2.ToImage(), ToChannels(cfg.input_size[0])]


def _tail(cfg: DataConfig) -> list[Any]:
    return [Normalize(cfg.mean, cfg.std)]


def _resize_crop(cfg: DataConfig) -> list[Any]:
    size = cfg.input_size[1]
    scale = int(size / cfg.crop_pct) if cfg.crop_pct else size
    return [v2.Resize(scale, interpolation=_interpolation(cfg.interpolation), antialias=True), v2.CenterCrop(size)]


def eval_transform(data_config: DataConfig) -> v2.Compose:
    """Resize to size / crop_pct, center-crop to size, scale to [0, 1] and normalise (timm's eval pipeline)."""
    return v2.Compose(_head(data_config) + _resize_crop(data_config) + _tail(data_config))


def train_transform(data_config: DataConfig, augment: str = "basic") -> v2.Compose:
    """Training pipeline for an augmentation preset (`AUGMENT_PRESETS`)."""
    if augment == "none":
        return eval_transform(data_config)
    size = data_config.input_size[1]
    interp = _interpolation(data_config.interpolation)
    crop = v2.RandomResizedCrop(size, interpolation=interp, antialias=True)
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
        "randaugment": [crop, v2.RandomHorizontalFlip(), v2.RandAugment(interpolation=interp)],
        "trivialaugment": [crop, v2.RandomHorizontalFlip(), v2.TrivialAugmentWide(interpolation=interp)],
    }
    if augment not in presets:
        raise ConfigError(f"data.augment {augment!r} is not a preset; choose one of {list(AUGMENT_PRESETS)}")
    return v2.Compose(_head(data_config) + presets[augment] + _tail(data_config))
