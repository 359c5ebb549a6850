"""Prediction as a method: class names and probabilities for image files, a folder or PIL images, from a checkpoint
or an exported timm folder, with exactly the preprocessing and model path of `ftlab predict`."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from datamodules.batches import Sample, Transformed, collate
from datamodules.common import ConfigError
from datamodules.datasets import ImageFiles
from datamodules.images import list_images, to_rgb
from datamodules.transforms import eval_transform
from lightning_modules.backbones.weights import load_state_dict_file
from lightning_modules.module import FineTuneModule
from lightning_modules.reporting.checkpoint_io import load_module

ImageInput = str | Path | Image.Image | np.ndarray


IMAGE_INPUTS = "Predictor takes image files, folders of images, PIL images or H x W x 3 uint8 arrays, or a list"


def image_from_array(array: np.ndarray, position: int) -> Image.Image:
    """A PIL image of an H x W x 3 (RGB), H x W x 4 (RGBA) or H x W (grayscale) uint8 array; a ConfigError saying
    what it takes otherwise (a float array, channels first, a batch)."""
    channels_last = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))
    if array.dtype != np.uint8 or not channels_last:
        raise ConfigError(
            f"{IMAGE_INPUTS}; the array at position {position} is {array.dtype} of shape {array.shape}. Convert it "
            "with (array * 255).clip(0, 255).astype(np.uint8) from floats in [0, 1], array.transpose(1, 2, 0) from "
            "channels first; pass a batch as a list of arrays"
        )
    return Image.fromarray(array)


@dataclass(frozen=True)
class Prediction:
    """One image's prediction: `source` (its path, or `image <k>` for the k-th PIL image given), the predicted
    class and its probability, every class's probability; for a file that could not be read, `error` says why and
    the rest is empty."""

    source: str
    label: str | None
    probability: float
    probabilities: dict[str, float]
    error: str | None = None


class Predictor:
    """A trained FineTuneModule in eval mode with its preprocessing (`eval_transform` of the backbone's data
    config); `predictor(images)` runs the module's own `predict_step` (its inference engine and test-time
    augmentation included), as `ftlab predict` does.

    Args:
        model: a trained module (its `class_names` name the classes).
        device: where the model runs.
        batch_size: images per forward pass.
    """

    def __init__(self, model: FineTuneModule, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        self.module = model.to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.transform = eval_transform(model.data_config)
        self.module.on_predict_start()  # a fresh inference engine for these weights

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", **kwargs: Any) -> Predictor:
        """The model of a `.ckpt` file (nothing downloaded: the checkpoint holds every weight); a ConfigError naming
        the file when it is missing, damaged or not a checkpoint of `ftlab fit`."""
        return cls(load_module(path), device, **kwargs)

    @classmethod
    def from_timm_folder(cls, folder: str | Path, device: str | torch.device = "cpu", **kwargs: Any) -> Predictor:
        """The model of a timm folder written by `scripts/export.py` (`config.json` with `label_names` and the
        preprocessing, `model.safetensors`): the backbone through `timm/local-dir:`, the classifier as the head."""
        folder = Path(folder)
        config_file, weights_file = folder / "config.json", folder / "model.safetensors"
        if not config_file.is_file() or not weights_file.is_file():
            raise ConfigError(f"{folder} is not a timm folder: it needs config.json and model.safetensors")
        config = json.loads(config_file.read_text())
        names = list(config.get("label_names") or [])
        classifier = str(config.get("pretrained_cfg", {}).get("classifier") or "classifier")
        if len(names) < 2:
            raise ConfigError(f"{config_file} names no classes (label_names); export it with scripts/export.py")
        model = FineTuneModule(f"timm/local-dir:{folder}", "pretrained", num_classes=len(names), class_names=names)
        state = load_state_dict_file(weights_file)
        head = {k.removeprefix(f"{classifier}."): v for k, v in state.items() if k.startswith(f"{classifier}.")}
        model.head[-1].load_state_dict(head)
        return cls(model, device, **kwargs)

    @property
    def class_names(self) -> list[str]:
        """The classes, in the order of each prediction's probabilities."""
        return list(self.module.class_names)

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> list[Prediction]:
        """Predictions for a file, a folder (every image file under it, sorted, as `ftlab predict`), a PIL image,
        an image array (H x W x 3 or H x W, uint8, RGB: OpenCV's BGR after `cvtColor`), or a list of these; an
        unreadable file is a prediction with an `error`, never left out or replaced."""
        items = [images] if isinstance(images, str | Path | Image.Image | np.ndarray) else list(images)
        samples: list[tuple[str, Sample]] = []
        for item in items:
            samples += self._samples(item, len(samples))
        predictions = []
        for start in range(0, len(samples), self.batch_size):
            predictions += self._predict(samples[start : start + self.batch_size])
        return predictions

    def _samples(self, item: ImageInput, position: int) -> list[tuple[str, Sample]]:
        """(source, sample) pairs of one input: through `ImageFiles` for files (header check, decoding,
        EXIF, RGB, as the DataModule reads them), `to_rgb` for a PIL image."""
        if isinstance(item, np.ndarray):
            item = image_from_array(item, position)
        if isinstance(item, Image.Image):
            return [(f"image {position}", Sample(self.transform(to_rgb(item)), -1, position))]
        if not isinstance(item, str | Path):
            raise ConfigError(f"{IMAGE_INPUTS}; got {type(item).__name__} at position {position}")
        path = Path(item)
        if not path.exists():
            raise ConfigError(f"{path} does not exist; {IMAGE_INPUTS}")
        paths = list_images(path) if path.is_dir() else [path]
        files = ImageFiles([(p, -1) for p in paths])
        out = [(str(bad.path), Sample(bad, -1, -1)) for bad in files.rejected]
        dataset = Transformed(files, self.transform)
        return out + [(files.paths[i], dataset[i]) for i in range(len(files))]

    @torch.no_grad()
    def _predict(self, chunk: Iterable[tuple[str, Sample]]) -> list[Prediction]:
        """One batch through the module's `predict_step`, the predictions in input order."""
        sources, samples = zip(*chunk, strict=True)
        batch = collate([s._replace(position=i) for i, s in enumerate(samples)], split="predict")
        batch = batch._replace(inputs=batch.inputs.to(self.device))
        probs = self.module.predict_step(batch, 0).float().cpu()
        by_position = dict(zip(batch.indices.tolist(), probs.tolist(), strict=True))
        errors = {bad.path: bad.reason for bad in batch.skipped}
        names = self.class_names
        predictions = []
        for i, (source, sample) in enumerate(zip(sources, samples, strict=True)):
            if i not in by_position:
                reason = errors.get(source) or getattr(sample.image, "reason", "unreadable")
                predictions.append(Prediction(source, None, float("nan"), {}, reason))
                continue
            p = by_position[i]
            best = max(range(len(p)), key=p.__getitem__)
            predictions.append(Prediction(source, names[best], p[best], dict(zip(names, p, strict=True))))
        return predictions
