"""sklearn's bundled handwritten digits: 1,797 real 8x8 grayscale images of 0-9, no download."""

from __future__ import annotations

from typing import Any

import torch
from typing_extensions import override

from datamodules.base import ImageClassificationDataModule
from datamodules.datasets import LabeledDataset, TensorImages


class DigitsDataModule(ImageClassificationDataModule):
    """The UCI digits from `sklearn.datasets.load_digits`, split stratified and seeded into train / val / test.

    Images are upsampled to the backbone's input size (set `model.image_size` for a smaller one) and repeated
    to three channels for pretrained backbones. The default augmentation is `none`: flipped digits are not digits.
    """

    def __init__(self, augment: str = "none", **kwargs: Any) -> None:
        super().__init__(augment=augment, **kwargs)

    @override
    @property
    def class_names(self) -> list[str]:
        """The digits 0 to 9."""
        return [str(d) for d in range(10)]

    @override
    def build_splits(self) -> dict[str, LabeledDataset]:
        """All 1,797 images as `train`; the base class carves test and val from it."""
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels = torch.as_tensor(digits.images, dtype=torch.float32) * (255.0 / 16.0)
        images = pixels.round().clamp(0, 255).to(torch.uint8).unsqueeze(1)
        return {"train": TensorImages(images, digits.target.tolist())}
