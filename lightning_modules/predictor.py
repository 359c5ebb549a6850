"""Prediction as a method: class names and probabilities for image files, a folder or PIL images, from a checkpoint
or an exported timm folder, with exactly the preprocessing and model path of `ftlab predict`."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from datamodules.batches import Batch, Sample
from datamodules.common import ConfigError, close_names
from datamodules.datasets import ImageFiles
from datamodules.images import BadSample, ImageSource, list_images, load_image
from datamodules.transforms import eval_transform
from lightning_modules.backbones.weights import load_state_dict_file
from lightning_modules.module import FineTuneModule
from lightning_modules.reporting.checkpoint_io import load_module
from lightning_modules.reporting.explain import check_method, explain_images
from lightning_modules.speed.engines import check_engine

ImageInput = str | Path | Image.Image | np.ndarray
Decoded = Image.Image | torch.Tensor | BadSample  # an input decoded (PIL or a uint8 tensor), or why it could not be


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


@dataclass(frozen=True)
class Explanation:
    """One image's class activation map: `source` as in `Prediction`, the class explained and the model's
    probability of it, `heatmap` (float32, the image's height x width, in [0, 1]: 0 where the crop left the image
    out) and `overlay` (the map over the image, an RGB PIL image of its size); for an unreadable file, `error`."""

    source: str
    label: str | None
    probability: float
    heatmap: np.ndarray | None
    overlay: Image.Image | None
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
        """The model of a `.ckpt` file (nothing downloaded: the checkpoint holds every weight); a ConfigError naming
        the file when it is missing, damaged or not a checkpoint of `ftlab fit`."""
        return cls(load_module(path), device, **kwargs)

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
        an image array (H x W x 3 or H x W, uint8, RGB: OpenCV's BGR after `cvtColor`), or a list of these; an
        unreadable file is a prediction with an `error`, never left out or replaced."""
        return [p for chunk in self._chunks(images) for p in self._predict(chunk)]

    def explain(
        self, images: ImageInput | Sequence[ImageInput], target: str | int | None = None, method: str = "gradcam"
    ) -> list[Explanation]:
        """Class activation maps (pytorch-grad-cam's `method`: `gradcam`, `gradcam++`, `eigencam` ...) for the
        images `__call__` takes, one per image in its order: for `target` (a class name or index; None: the
        predicted class, as `__call__` predicts it, TTA included). The same preprocessing; the CAM pass runs the
        torch network whatever the inference engine. A ConfigError for a backbone without a spatial map."""
        check_method(method)
        names = self.class_names
        if isinstance(target, str) and target not in names:
            raise ConfigError(f"no class {target!r} to explain; did you mean {close_names(target, names, n=1)}?")
        if isinstance(target, int) and not 0 <= target < len(names):
            raise ConfigError(f"class index {target} to explain: the model has classes 0 to {len(names) - 1}")
        fixed = names.index(target) if isinstance(target, str) else target
        out = []
        for chunk in self._chunks(images):
            predictions = self._predict(chunk)
            readable = [i for i, p in enumerate(predictions) if p.error is None]
            targets = [fixed if fixed is not None else names.index(str(predictions[i].label)) for i in readable]
            maps = self._maps([chunk[i][1] for i in readable], targets, method)
            by_index = dict(zip(readable, zip(targets, maps, strict=True), strict=True))
            for i, p in enumerate(predictions):
                if i not in by_index:
                    out.append(Explanation(p.source, None, float("nan"), None, None, p.error))
                    continue
                k, (heatmap, image) = by_index[i]
                out.append(Explanation(p.source, names[k], p.probabilities[names[k]], heatmap, image))
        return out

    def _maps(self, decoded: list[Decoded], targets: list[int], method: str) -> list[tuple[np.ndarray, Image.Image]]:
        """Heat map and overlay of each decoded image for its target class (none for no image)."""
        if not decoded:
            return []
        inputs = torch.stack([self._input(d) for d in decoded]).to(self.device)
        module = self.module
        return explain_images(module.backbone, module.head, inputs, decoded, targets, self.transform, method)  # type: ignore[arg-type]

    def _chunks(self, images: ImageInput | Sequence[ImageInput]) -> list[list[tuple[str, Decoded]]]:
        """The inputs in batches of (source, decoded image or BadSample), decoded one batch at a time."""
        items = [images] if isinstance(images, str | Path | Image.Image | np.ndarray) else list(images)
        sources: list[tuple[str, Callable[[], Decoded]]] = []
        for item in items:
            sources += self._sources(item, len(sources))
        return [
            [(source, load()) for source, load in sources[start : start + self.batch_size]]
            for start in range(0, len(sources), self.batch_size)
        ]

    def _sources(self, item: ImageInput, position: int) -> list[tuple[str, Callable[[], Decoded]]]:
        """(source, decoder) pairs of one input: through `ImageFiles` for files (header check, decoding, EXIF, RGB,
        as the DataModule reads them), `load_image` for a PIL image or an image array."""
        if isinstance(item, np.ndarray):
            item = image_from_array(item, position)
        if isinstance(item, Image.Image):
            image = item
            return [(f"image {position}", lambda: load_image(image))]
        if not isinstance(item, str | Path):
            raise ConfigError(f"{IMAGE_INPUTS}; got {type(item).__name__} at position {position}")
        path = Path(item)
        if not path.exists():
            raise ConfigError(f"{path} does not exist; {IMAGE_INPUTS}")
        paths = list_images(path) if path.is_dir() else [path]
        files = ImageFiles([(p, -1) for p in paths])
        out: list[tuple[str, Callable[[], Decoded]]] = [(str(bad.path), partial(_same, bad)) for bad in files.rejected]
        return out + [(files.paths[i], partial(_decoded, files, i)) for i in range(len(files))]

    def _input(self, decoded: Decoded) -> Any:
        """The model's input of a decoded image (the eval transform); an unreadable one as it is."""
        return decoded if isinstance(decoded, BadSample) else self.transform(decoded)

    def _predict(self, chunk: Sequence[tuple[str, Decoded]]) -> list[Prediction]:
        """One batch of the readable images through `probabilities`, the predictions in input order."""
        sources = [source for source, _ in chunk]
        samples = [Sample(self._input(d), -1, i) for i, (_, d) in enumerate(chunk)]
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


def _same(bad: BadSample) -> Decoded:
    return bad


def _decoded(files: ImageFiles, index: int) -> Decoded:
    image: Decoded = files[index][0]
    return image
