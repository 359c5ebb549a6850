"""`ftlab serve`: a checkpoint or a timm folder behind LitServe, and how the server ends.

LitServe's `run` drains on Ctrl+C: its HTTP processes get SIGTERM and (uvicorn) finish the requests in flight while
the inference workers still answer, then the workers stop. A SIGTERM to the main process would end it at once,
orphaning the rest, so `serve` makes SIGTERM take that same path (Python's own SIGINT handler, which raises
KeyboardInterrupt) and ends with 128 + the signal's number, as a shell reports a process a signal ended: 143.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import litserve as ls
import torch

from datamodules.common import cores
from lightning_modules.predictor import Predictor
from lightning_modules.serving.api import LOG_FORMAT, ImageClassifierAPI, logger
from lightning_modules.serving.requests import ImageRequests
from lightning_modules.speed.engines import auto_engine

# measured with scripts/benchmark.py --parts serve on the own-images Lite0 model (docs/benchmark.md, serving)
MAX_BATCH_SIZE = 8
BATCH_TIMEOUT = 0.0  # seconds: a batch takes what is waiting when it starts, and waits for nothing more
REQUEST_TIMEOUT = 30.0  # seconds a request may wait in the queue before a 504


@dataclass(frozen=True)
class ServeOptions:
    """How the server runs: where, its batching, and its workers.

    Args:
        host: the interface to listen on (LitServe takes 127.0.0.1, 0.0.0.0 or ::).
        port: the TCP port.
        max_batch_size: the most requests in one forward pass.
        batch_timeout: seconds a batch waits for more requests after its first.
        engine: `torch`, `onnxruntime` or `auto`.
        accelerator: `auto`, `cpu`, `cuda` or `mps`.
        devices: how many GPUs (`auto`: all); one CPU is one device.
        workers_per_device: inference processes per device; None: one per CPU core (each pinned to its core),
            one per GPU.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = MAX_BATCH_SIZE
    batch_timeout: float = BATCH_TIMEOUT
    engine: str = "auto"
    accelerator: str = "auto"
    devices: int | str = "auto"
    workers_per_device: int | None = None


def weights_digest(path: Path) -> str:
    """The first 12 hex digits of the SHA-256 of the weights file (a checkpoint, or a timm folder's safetensors)."""
    file = path / "model.safetensors" if path.is_dir() else path
    h = hashlib.sha256()
    with file.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def model_name(path: Path) -> str:
    """What names the model in answers: `<experiment>/version_N` for a run's checkpoint, else the file's stem or the
    folder's name."""
    if path.is_file() and path.parent.name == "checkpoints" and path.parent.parent.name.startswith("version_"):
        return f"{path.parent.parent.parent.name}/{path.parent.parent.name}"
    return path.stem if path.is_file() else path.name


def describe(predictor: Predictor, path: Path, options: ServeOptions) -> dict[str, Any]:
    """What `GET /info` says of the model: name, version, backbone, classes, preprocessing, engine, batching."""
    module = predictor.module
    backbone = str(module.hparams["backbone"])
    device = serving_device(options)
    engine, why = (options.engine, "as asked") if options.engine != "auto" else auto_engine(backbone, device)
    config = module.data_config
    return {
        "name": model_name(path),
        "version": weights_digest(path),
        "path": str(path),
        "backbone": backbone,
        "classes": predictor.class_names,
        "preprocessing": {
            "size": list(config.input_size[1:]),
            "channels": config.input_size[0],
            "mean": list(config.mean),
            "std": list(config.std),
            "interpolation": config.interpolation,
            "crop_pct": config.crop_pct,
            "crop_mode": config.crop_mode,
        },
        "engine": engine,
        "engine_reason": why,
        "max_batch_size": options.max_batch_size,
        "batch_timeout": options.batch_timeout,
        "workers_per_device": workers_per_device(options),
    }


def serving_device(options: ServeOptions) -> torch.device:
    """What the workers run on: a GPU when the accelerator allows one and there is one, else the CPU."""
    gpu = options.accelerator in ("auto", "cuda") and torch.cuda.is_available()
    return torch.device("cuda" if gpu else "mps" if options.accelerator == "mps" else "cpu")


def workers_per_device(options: ServeOptions) -> int:
    """The workers on each device: as given, else one per CPU core (a CPU is one device to LitServe) or per GPU."""
    if options.workers_per_device is not None:
        return options.workers_per_device
    return cores() if serving_device(options).type == "cpu" else 1


def build_server(path: Path, info: dict[str, Any], options: ServeOptions) -> ls.LitServer:
    """The LitServer of the model at `path`: `POST /predict` behind `ImageRequests`, `GET /health`, `GET /info`."""
    api = ImageClassifierAPI(
        str(path),
        info["name"],
        info["version"],
        options.engine,
        options.max_batch_size,
        options.batch_timeout,
        workers_per_device(options),
    )
    return ls.LitServer(
        api,
        accelerator=options.accelerator,
        devices=options.devices,
        workers_per_device=workers_per_device(options),
        timeout=REQUEST_TIMEOUT,
        model_metadata=info,
        middlewares=[(ImageRequests, {"path": api.api_path})],
    )


class SignalStop:
    """SIGTERM and SIGINT in the main process end the server as Ctrl+C does (LitServe drains then), remembered for
    the exit status; in a process forked from it (an HTTP process, whose uvicorn re-raises the signal once it has
    drained) they end that process quietly."""

    def __init__(self) -> None:
        self.main_pid = os.getpid()
        self.signum: int | None = None

    def install(self) -> None:
        """Handle SIGTERM and SIGINT from now on."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.handle)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """Raise KeyboardInterrupt in the main process; exit with 128 + `signum` in a forked one."""
        if os.getpid() != self.main_pid:
            raise SystemExit(128 + signum)
        if self.signum is None:
            self.signum = signum
            logger.info("%s: finishing the requests in flight", signal.strsignal(signum))
        signal.default_int_handler(signum, frame)

    @property
    def status(self) -> int:
        """0, or 128 + the signal that stopped the server."""
        return 0 if self.signum is None else 128 + self.signum


def serve(path: Path, info: dict[str, Any], options: ServeOptions, stop: SignalStop) -> int:
    """Serve the model at `path` (described by `info`) until a signal; the exit status (143 after SIGTERM)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    server = build_server(path, info, options)
    stop.install()
    with contextlib.suppress(KeyboardInterrupt):  # a signal before LitServe's own handling began
        server.run(
            host=options.host,
            port=options.port,
            generate_client_file=False,
            access_log=False,  # one line per batch and per rejected request instead (`api.py`, `requests.py`)
        )
    return stop.status
