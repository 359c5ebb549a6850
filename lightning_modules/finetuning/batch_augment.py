"""Augmentation of whole batches: mixup and cutmix while training, test-time augmentation (TTA) at test and predict.

Both work on image batches on the model's device (a GPU mixes its own batch); cached backbone features are neither
mixed nor augmented (they are one fixed view of each image).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from datamodules.common import ConfigError

TTA_MODES = ("none", "flip", "flip_crops")


class BatchMixer:
    """torchvision's `MixUp` and `CutMix` (one of the two, chosen at random per batch, when both are on), drawn from
    a generator seeded by (run seed, step): a resumed run mixes each step as the uninterrupted one did.

    Args:
        num_classes: the targets become (batch, num_classes) probabilities.
        mixup: MixUp's Beta(alpha, alpha) parameter; 0: off.
        cutmix: CutMix's Beta(alpha, alpha) parameter; 0: off.
    """

    def __init__(self, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0) -> None:
        for key, alpha in (("mixup", mixup), ("cutmix", cutmix)):
            if alpha < 0:
                raise ConfigError(f"model.{key} is {alpha}: the Beta distribution's alpha must be >= 0 (0: off)")
        mixers: list[Callable[..., tuple[torch.Tensor, torch.Tensor]]] = []
        if mixup > 0:
            mixers.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
        if cutmix > 0:
            mixers.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
        self.mix = None if not mixers else mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)

    @property
    def active(self) -> bool:
        """True when mixup or cutmix is on."""
        return self.mix is not None

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed images and their soft targets (batch, num_classes); each image is mixed with its neighbour in
        the batch (torchvision's rule), with one mixing weight per batch."""
        assert self.mix is not None
        with torch.random.fork_rng(devices=[]):  # the global generator is left as it was
            torch.default_generator.manual_seed(seed)  # CPU: the mixing weight and the box are drawn there
            return self.mix(images, targets)


def tta_views(images: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The views of a batch that test-time augmentation averages: the images; `flip` adds their mirror images;
    `flip_crops` adds the four corner crops of 7/8 of the side, resized back to the input size."""
    if mode not in TTA_MODES:
        raise ConfigError(f"model.tta {mode!r}: choose one of {list(TTA_MODES)}")
    views = [images]
    if mode in ("flip", "flip_crops"):
        views.append(images.flip(-1))
    if mode == "flip_crops":
        h, w = images.shape[-2:]
        ch, cw = round(h * 7 / 8), round(w * 7 / 8)
        for top, left in ((0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw)):
            crop = images[..., top : top + ch, left : left + cw]
            views.append(F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False, antialias=True))
    return views


def averaged_log_probabilities(run: Callable[[torch.Tensor], torch.Tensor], views: list[torch.Tensor]) -> torch.Tensor:
    """The log of the mean of the views' class probabilities: logits whose softmax is that mean (so the loss,
    the metrics and `predict`'s probabilities all read the averaged probabilities)."""
    mean = torch.stack([run(v).float().softmax(dim=1) for v in views]).mean(0)
    return mean.clamp_min(torch.finfo(mean.dtype).tiny).log()
