"""Prediction as a method: class names and probabilities for image files, a folder or PIL images, from a checkpoint
or an exported timm folder, with exactly the preprocessing and model path of `ftlab predict`."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from datamodules.batches import Batch, Sample, Transformed
from datamodules.common import ConfigError
from datamodules.datasets import ImageFiles
from datamodules.images import BadSample, ImageSource, list_images, load_image
from datamodules.transforms import eval_transform
from lightning_modules.backbones.weights import load_state_dict_file
from lightning_modules.module import FineTuneModule
from lightning_modules.speed.engines import check_engine

ImageInput = str | Path | Image.Image  # a file or folder, or an image already opened


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
        engine: what runs the model (`torch`, `onnxruntime`, `auto`); None: the module's `inference_engine`.
        images: how many images it will see in all, which `auto` weighs against the cost of an ONNX export (a few
            photos: torch); None when there is no end to them (a server).
    """

    def __init__(
        self,
        model: FineTuneModule,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        engine: str | None = None,
        images: int | None = 0,
    ) -> None:
        self.module = model.to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.transform = eval_transform(model.data_config)
        if engine is not None:
            self.module.hparams["inference_engine"] = check_engine(engine, "engine")
        self.module.pass_images = images
        self.module.on_predict_start()  # a fresh inference engine for these weights

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", **kwargs: Any) -> Predictor:
        """The model of a `.ckpt` file (nothing downloaded: the checkpoint holds every weight)."""
        if not Path(path).is_file():
            raise ConfigError(
                f"checkpoint {path} does not exist; pass a .ckpt file (runs/<name>/version_N/checkpoints)"
            )
        return cls(FineTuneModule.load_from_checkpoint(path, map_location="cpu", weights_only=True), device, **kwargs)

    @classmethod
    def from_path(cls, path: str | Path, device: str | torch.device = "cpu", **kwargs: Any) -> Predictor:
        """The model of a `.ckpt` file or of a timm folder (`scripts/export.py`), by what `path` is."""
        if Path(path).is_dir():
            return cls.from_timm_folder(path, device, **kwargs)
        return cls.from_checkpoint(path, device, **kwargs)

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

    @property
    def engine(self) -> str | None:
        """What runs the model (`torch`, `onnxruntime`), once the first batch has chosen it; None before."""
        return self.module.engine

    def preprocess(self, image: ImageSource) -> torch.Tensor:
        """One image (a file, its bytes, a PIL image) as the model's input: `load_image` then the eval transform,
        as every loader reads it. Raises what `load_image` raises (`DECODE_ERRORS`)."""
        return self.transform(load_image(image))

    @torch.no_grad()
    def probabilities(self, inputs: torch.Tensor) -> torch.Tensor:
        """Class probabilities (batch, classes) on the CPU of preprocessed images stacked (batch, C, H, W), by the
        module's `predict_step`."""
        n = len(inputs)
        unlabeled, positions = torch.full((n,), -1, dtype=torch.long), torch.arange(n)
        batch = Batch(inputs.to(self.device), unlabeled, positions, [], "predict")
        return self.module.predict_step(batch, 0).float().cpu()

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> list[Prediction]:
        """Predictions for a file, a folder (every image file under it, sorted, as `ftlab predict`), a PIL image,
        or a list of these; an unreadable file is a prediction with an `error`, never left out or replaced."""
        items = [images] if isinstance(images, str | Path | Image.Image) else list(images)
        samples: list[tuple[str, Sample]] = []
        for item in items:
            samples += self._samples(item, len(samples))
        predictions = []
        for start in range(0, len(samples), self.batch_size):
            predictions += self._predict(samples[start : start + self.batch_size])
        return predictions

    def _samples(self, item: ImageInput, position: int) -> list[tuple[str, Sample]]:
        """(source, sample) pairs of one input: through `ImageFiles` for files (header check, decoding,
        EXIF, RGB, as the DataModule reads them), `preprocess` for a PIL image."""
        if isinstance(item, Image.Image):
            return [(f"image {position}", Sample(self.preprocess(item), -1, position))]
        path = Path(item)
        if not path.exists():
            raise ConfigError(f"{path} does not exist: pass image files, a folder of images or PIL images")
        paths = list_images(path) if path.is_dir() else [path]
        files = ImageFiles([(p, -1) for p in paths])
        out = [(str(bad.path), Sample(bad, -1, -1)) for bad in files.rejected]
        dataset = Transformed(files, self.transform)
        return out + [(files.paths[i], dataset[i]) for i in range(len(files))]

    def _predict(self, chunk: Iterable[tuple[str, Sample]]) -> list[Prediction]:
        """One batch of the readable images through `probabilities`, the predictions in input order."""
        sources, samples = zip(*chunk, strict=True)
        readable = [i for i, s in enumerate(samples) if not isinstance(s.image, BadSample)]
        rows = self.probabilities(torch.stack([samples[i].image for i in readable])).tolist() if readable else []
        by_position = dict(zip(readable, rows, strict=True))
        names = self.class_names
        predictions = []
        for i, (source, sample) in enumerate(zip(sources, samples, strict=True)):
            if i not in by_position:
                reason = sample.image.reason if isinstance(sample.image, BadSample) else "unreadable"
                predictions.append(Prediction(source, None, float("nan"), {}, reason))
                continue
            p = by_position[i]
            best = max(range(len(p)), key=p.__getitem__)
            predictions.append(Prediction(source, names[best], p[best], dict(zip(names, p, strict=True))))
        return predictions
