"""Augmentation presets at the sizes they meet (32 px digits and CIFAR, photos at 224 px) and the train subset."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torchvision.transforms import v2

from datamodules import ImageFolderDataModule
from datamodules.common import ConfigError, DataConfig
from datamodules.datasets import Subset
from datamodules.transforms import AUGMENT_PRESETS, RandomCrop, train_transform
from lightning_modules.backbones.backbone import resolve_data_config
from tests.helpers.data import photo, write_class_folders

SCRATCH_32 = resolve_data_config("scratch/simple_cnn", "none", 32)  # mean 0.5, std 0.5, crop_pct 1
LITE0 = resolve_data_config("timm/tf_efficientnet_lite0", "embedded")  # 224 px, bicubic, crop_pct 0.875


def _pixels(out: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """Undo the normalisation: back to 0-255 values."""
    mean, std = torch.tensor(cfg.mean).view(-1, 1, 1), torch.tensor(cfg.std).view(-1, 1, 1)
    return (out * std + mean) * 255.0


def _shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """`image` moved by (dy, dx) with zero fill, the same size."""
    out = torch.zeros_like(image)
    h, w = image.shape[-2:]
    out[:, max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)] = image[
        :, max(0, -dy) : h + min(0, -dy), max(0, -dx) : w + min(0, -dx)
    ]
    return out


@pytest.mark.parametrize("preset", AUGMENT_PRESETS)
@pytest.mark.parametrize(("cfg", "source"), [(SCRATCH_32, (32, 32)), (LITE0, (500, 375)), (LITE0, (32, 32))])
def test_every_preset_gives_the_backbone_input_size_from_small_and_large_images(
    preset: str, cfg: DataConfig, source: tuple[int, int]
) -> None:
    out = train_transform(cfg, preset)(photo(1, size=source))
    assert out.shape == cfg.input_size and out.dtype == torch.float32


def test_basic_at_32_px_is_a_padded_random_crop_and_flip_never_a_zoom() -> None:
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    transform = train_transform(SCRATCH_32, "basic")
    seen_shifts, flips = set(), 0
    for seed in range(60):
        torch.manual_seed(seed)
        out = _pixels(transform(image), SCRATCH_32).round()
        matches = [
            (dy, dx, flipped)
            for flipped in (False, True)
            for dy in range(-4, 5)
            for dx in range(-4, 5)
            if torch.equal(out, _shifted(image.flip(-1) if flipped else image, dy, dx).float())
        ]
        assert matches, f"seed {seed}: the output is not the image shifted by at most 4 px (a zoom or a crop)"
        seen_shifts.add(matches[0][:2])
        flips += matches[0][2]
    assert len(seen_shifts) > 10 and 10 < flips < 50  # random shifts over the whole +-4 range, and flips


def test_basic_on_photos_keeps_at_least_the_crop_scale_of_the_area() -> None:
    crop = RandomCrop(LITE0, scale=(0.35, 1.0))
    assert crop.large.scale == (0.35, 1.0)
    params = [crop.large.make_params([torch.zeros(3, 375, 500)]) for _ in range(200)]
    areas = [p["height"] * p["width"] / (375 * 500) for p in params]
    assert min(areas) >= 0.35 - 0.01 and max(areas) > 0.8
    assert train_transform(LITE0, "basic", crop_scale=0.08).transforms[2].large.scale == (0.08, 1.0)
    with pytest.raises(ConfigError, match="crop_scale must be in"):
        train_transform(LITE0, "basic", crop_scale=0.0)


# ------------------------------------------------------------------------------------------- train subset


def _module(root: Path, subset: Any, seed: int = 42) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(
        root=str(root),
        num_workers=0,
        data_config=SCRATCH_32.to_dict(),
        train_subset=subset,
        split_seed=seed,
        val_fraction=0.2,
        test_fraction=0.2,
    )
    dm.setup()
    return dm


def _files(dm: ImageFolderDataModule, split: str) -> list[str]:
    """The files of a split, through its chain of subsets."""
    names = []
    for index in range(len(dm.datasets[split])):
        dataset: Any = dm.datasets[split].dataset
        while isinstance(dataset, Subset):
            index, dataset = dataset.indices[index], dataset.dataset
        names.append(dataset.paths[index])
    return names


@pytest.fixture
def unbalanced(tmp_path: Path) -> Path:
    write_class_folders(tmp_path / "imgs", {"a": 50, "b": 25, "c": 10})
    return tmp_path / "imgs"


def test_train_subset_by_fraction_keeps_class_proportions_and_leaves_val_and_test_alone(unbalanced: Path) -> None:
    full, half = _module(unbalanced, None), _module(unbalanced, 0.5)
    full_counts = Counter(full.datasets["train"].dataset.targets)
    half_counts = Counter(half.datasets["train"].dataset.targets)
    assert full_counts == {0: 32, 1: 16, 2: 6}
    assert half_counts == {0: 16, 1: 8, 2: 3}
    assert set(_files(half, "train")) < set(_files(full, "train"))
    for split in ("val", "test"):
        assert half.datasets[split].dataset.targets == full.datasets[split].dataset.targets
    assert half.split_sizes() == {"train": 27, "val": 14, "test": 17}


def test_train_subset_by_count_per_class_is_seeded(unbalanced: Path) -> None:
    five = _module(unbalanced, 5)
    assert Counter(five.datasets["train"].dataset.targets) == {0: 5, 1: 5, 2: 5}
    assert _files(five, "train") == _files(_module(unbalanced, 5), "train")
    assert _files(five, "train") != _files(_module(unbalanced, 5, seed=7), "train")
    twenty = _module(unbalanced, 20)  # a class with fewer keeps all it has
    assert Counter(twenty.datasets["train"].dataset.targets) == {0: 20, 1: 16, 2: 6}


@pytest.mark.parametrize("bad", [0, -1, 1.5, 2.5])
def test_train_subset_that_is_neither_fraction_nor_count_is_a_clear_error(bad: float) -> None:
    with pytest.raises(ConfigError, match=r"data\.init_args\.train_subset must be a fraction"):
        ImageFolderDataModule(root="anywhere", train_subset=bad)


@pytest.mark.parametrize(
    ("model", "crop_mode"),
    [
        ("efficientnet_lite0.ra_in1k", "center"),
        ("convnext_base.fb_in22k_ft_in1k_384", "squash"),
        ("deepseek_vit_412m.deepseek_v4_flash_vision_exp", "border"),
    ],
)
def test_eval_transform_is_timms_own_for_each_crop_mode(model: str, crop_mode: str) -> None:
    import timm
    from timm.data import create_transform
    from timm.data import resolve_data_config as timm_resolve

    from datamodules.transforms import eval_transform

    ours = resolve_data_config(f"timm/{model}", "none")
    assert ours.crop_mode == crop_mode
    pretrained = timm.get_pretrained_cfg(model)
    assert pretrained is not None
    theirs = create_transform(**timm_resolve(pretrained_cfg=pretrained.to_dict()))
    # tall: squash, border and center crop it differently. A float tensor in [0, 1], as timm's own pipeline takes
    # it (ours resizes tensors, as it does in training); border pads on PIL images only, in timm and here
    image = photo(7, (200, 300))
    tensor = v2.functional.to_dtype(v2.functional.pil_to_tensor(image), torch.float32, scale=True)
    given = image if crop_mode == "border" else tensor
    expected = theirs(given)
    got = eval_transform(ours)(given)
    assert got.shape == expected.shape == (3, *ours.input_size[1:])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
