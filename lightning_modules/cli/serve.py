"""`ftlab serve --ckpt_path <ckpt, best, last or a timm folder> --port N`: the model behind an HTTP endpoint.

A subcommand of its own beside LightningCLI's fit, test and predict (which are Trainer methods with a DataModule):
serving needs no Trainer and no data, only the model and where to listen. Mistakes and a model that cannot load
are one line and exit status 2, before any worker starts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from datamodules.common import ConfigError
from lightning_modules.cli.checkpoints import CKPT_SHORTCUTS, resolve_checkpoint
from lightning_modules.console import setup_console
from lightning_modules.predictor import Predictor
from lightning_modules.serving.server import BATCH_TIMEOUT, MAX_BATCH_SIZE, ServeOptions, SignalStop, describe, serve
from lightning_modules.speed.engines import ENGINES

HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServe listens on


def serve_parser() -> argparse.ArgumentParser:
    """The options of `ftlab serve` (docs/serving.md)."""
    parser = argparse.ArgumentParser(prog="ftlab serve", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--ckpt_path", required=True, help="a .ckpt file, best or last (of the run under --runs), or a timm folder")
    add("--runs", default="runs/image_folder", help="the experiment's runs folder, for best and last")
    add("--port", type=int, default=8000, help="TCP port (1024-65535)")
    add("--host", default="127.0.0.1", choices=HOSTS, help="interface: 0.0.0.0 or :: to listen on every one")
    add("--max_batch_size", type=int, default=MAX_BATCH_SIZE, help="the most requests in one forward pass")
    add("--batch_timeout", type=float, default=BATCH_TIMEOUT, help="seconds a batch waits for more requests")
    add("--engine", default="auto", choices=ENGINES, help="auto: ONNX Runtime on CPU where it is faster")
    add("--accelerator", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    add("--devices", default="auto", help="how many GPUs (auto: all); a CPU is one device")
    add("--workers_per_device", type=int, help="inference processes per device (default: one per CPU core, or per GPU)")
    return parser


def model_path(ckpt_path: str, runs: str) -> Path:
    """The file or folder `--ckpt_path` names (`best` and `last` as `ftlab test` finds them), or a ConfigError."""
    path = resolve_checkpoint(ckpt_path, (Path(runs), None)) if ckpt_path in CKPT_SHORTCUTS else Path(ckpt_path)
    if not path.exists():
        raise ConfigError(f"--ckpt_path {path} does not exist: give a .ckpt file, best, last or a timm folder")
    return path


def serve_main(argv: Sequence[str]) -> int:
    """Parse, load the model once to check and describe it, then serve; the exit status."""
    setup_console()
    args = serve_parser().parse_args(list(argv))
    devices = int(args.devices) if str(args.devices).isdigit() else "auto"
    options = ServeOptions(
        args.host,
        args.port,
        args.max_batch_size,
        args.batch_timeout,
        args.engine,
        args.accelerator,
        devices,
        args.workers_per_device,
    )
    stop = SignalStop()
    try:
        if not 1024 <= options.port <= 65535 or options.max_batch_size < 1 or options.batch_timeout < 0:
            raise ConfigError("--port must be 1024-65535, --max_batch_size >= 1 and --batch_timeout >= 0")
        path = model_path(args.ckpt_path, args.runs)
        info = describe(load(path), path, options)
    except ConfigError as err:
        print(f"ftlab: error: {err}", file=sys.stderr)
        return 2
    return serve(path, info, options, stop)


def load(path: Path) -> Predictor:
    """The model at `path`, or a ConfigError in one line saying why it cannot load."""
    try:
        return Predictor.from_path(path)
    except ConfigError:
        raise
    except Exception as err:  # a cut, foreign or mismatched file fails anywhere in torch, timm or Lightning
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise ConfigError(f"cannot load the model at {path}: {type(err).__name__}: {first}") from None


if __name__ == "__main__":  # `ftlab serve ...` (cli.main runs this module), or `python -m lightning_modules.cli.serve`
    raise SystemExit(serve_main(sys.argv[1:]))
