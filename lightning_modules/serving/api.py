"""The model behind `ftlab serve`: LitServe's hooks filled with the `Predictor` (its preprocessing and model path,
those of `ftlab predict`); LitServe owns the HTTP processes, the batching and the workers.

The hooks' annotations are evaluated (no `from __future__ import annotations`): LitServe reads the type of
`decode_request`'s request from them, and FastAPI then parses the body into an `ImageRequest`.

A request that is not an image never fails its batch: LitServe answers a whole batch with the error when a hook
raises, so `decode_request` turns a bad image into a `Rejected` that rides through the batch and `encode_response`
answers it alone, with its 4xx.
"""

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import litserve as ls
import torch
from PIL import Image
from starlette.responses import JSONResponse
from typing_extensions import override

from datamodules.images import DECODE_ERRORS, bad_reason
from lightning_modules.predictor import Predictor
from lightning_modules.serving.batching import WaitingBatchedLoop
from lightning_modules.serving.requests import (
    BadRequest,
    ImageRequest,
    Rejected,
    base64_image,
    error_response,
    log_rejected,
)

logger = logging.getLogger("finetune_lab.serve")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
WARMUP_IMAGES = 2  # a first batch through the model at setup: the engine (an ONNX export, checked) is built then


def share_cores(worker: int, workers: int) -> None:
    """Pin CPU worker `worker` of `workers` to its share of this process's cores (every `workers`-th one), so that
    its torch and ONNX Runtime threads (`cores()`) do not outnumber the cores."""
    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if workers > 1 and len(available) >= workers:
        os.sched_setaffinity(0, available[worker % workers :: workers])
        torch.set_num_threads(len(available[worker % workers :: workers]))


@dataclass
class ImageBatch:
    """Decoded requests in arrival order, and the images of those that are not rejected, stacked."""

    items: list[torch.Tensor | Rejected]
    images: torch.Tensor | None


@dataclass
class Answer:
    """One request's outcome: the class probabilities, or why it was rejected."""

    probabilities: list[float] | None
    rejected: Rejected | None = None


class ImageClassifierAPI(ls.LitAPI):
    """Class probabilities of one image per request, for a checkpoint or a timm folder.

    Args:
        model_path: a `.ckpt` file or the timm folder `scripts/export.py` writes.
        model_name: the `model` of every answer.
        version: the `version` of every answer (a digest of the weights).
        engine: `torch`, `onnxruntime` or `auto` (ONNX Runtime on CPU for the families where it is faster).
        max_batch_size: the most requests in one forward pass.
        batch_timeout: seconds a batch waits for more requests after its first.
        workers: inference workers on each device; on a CPU each takes its share of the cores.
    """

    def __init__(
        self,
        model_path: str,
        model_name: str,
        version: str,
        engine: str = "auto",
        max_batch_size: int = 8,
        batch_timeout: float = 0.0,
        workers: int = 1,
    ) -> None:
        loop = WaitingBatchedLoop() if max_batch_size > 1 else "auto"  # 1: LitServe's own loop, unbatched
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, loop=loop)
        self.model_path = model_path
        self.model_name = model_name
        self.version = version
        self.engine = engine
        self.workers = workers

    @override
    def setup(self, device: str) -> None:
        """Load the model once per worker on `device` and run a first batch, so the engine is ready."""
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)  # a worker is a fresh (spawned) process
        if device == "cpu":
            share_cores(int(os.environ.get("LITSERVE_WORKER_ID", "0")), self.workers)
        self.predictor = Predictor.from_path(self.model_path, device, engine=self.engine, images=None)
        self.classes = self.predictor.class_names
        size = self.predictor.module.data_config.input_size
        self.predictor.probabilities(torch.randn(WARMUP_IMAGES, *size, generator=torch.Generator().manual_seed(0)))
        if device == "cpu" and self.predictor.engine != "torch":
            torch.set_num_threads(1)  # torch only preprocesses: its idle OpenMP threads spun against ONNX Runtime's
        logger.info("worker ready on %s: %s, engine %s", device, self.model_name, self.predictor.engine)

    @override
    def decode_request(self, request: ImageRequest, **kwargs: Any) -> torch.Tensor | Rejected:
        """The request's image as the model's input, or why it cannot be (logged once)."""
        try:
            return self.predictor.preprocess(base64_image(request.image))
        except BadRequest as err:
            rejected = err.rejected
        except DECODE_ERRORS as err:
            bomb = isinstance(err, Image.DecompressionBombError | Image.DecompressionBombWarning)
            rejected = Rejected(413 if bomb else 400, f"the image cannot be read: {bad_reason(err)}")
        log_rejected(rejected)
        return rejected

    @override
    def batch(self, inputs: list[torch.Tensor | Rejected]) -> ImageBatch:
        """The readable images stacked; the rejected ones keep their place."""
        images = [x for x in inputs if isinstance(x, torch.Tensor)]
        return ImageBatch(list(inputs), torch.stack(images) if images else None)

    @override
    def predict(self, x: ImageBatch | torch.Tensor | Rejected, **kwargs: Any) -> list[Answer]:
        """One forward pass over the batch's readable images; an answer per request, in order."""
        batch = x if isinstance(x, ImageBatch) else self.batch([x])  # max_batch_size 1: LitServe does not batch
        start = time.perf_counter()
        rows = iter(self.predictor.probabilities(batch.images).tolist() if batch.images is not None else [])
        answers = [Answer(None, item) if isinstance(item, Rejected) else Answer(next(rows)) for item in batch.items]
        if batch.images is not None:
            logger.info("batch of %d images in %.0f ms", len(batch.images), (time.perf_counter() - start) * 1e3)
        return answers

    @override
    def unbatch(self, output: list[Answer]) -> list[Answer]:
        """The answers, one per request."""
        return output

    @override
    def encode_response(self, output: Answer | list[Answer], **kwargs: Any) -> JSONResponse:
        """The JSON answer: classes, probabilities (same order), the top class, model and version; or the error."""
        answer = output[0] if isinstance(output, list) else output  # max_batch_size 1: `predict`'s list as is
        if answer.rejected is not None or answer.probabilities is None:
            return error_response(answer.rejected or Rejected(500, "no prediction"))
        best = max(range(len(answer.probabilities)), key=answer.probabilities.__getitem__)
        return JSONResponse(
            {
                "classes": self.classes,
                "probabilities": answer.probabilities,
                "top": self.classes[best],
                "probability": answer.probabilities[best],
                "model": self.model_name,
                "version": self.version,
            }
        )
