"""Inference engines for passes where no gradient flows (the feature cache's pass over a frozen backbone):
torch, or ONNX Runtime on CPU, where depthwise-convolution backbones run several times faster.

An ONNX Runtime pass is the module exported once (dynamo exporter, dynamic batch), kept on disk under a key of
its weights and input shape, and checked against torch on a real batch before it is used: a difference above
`TOLERANCE`, a failed export or a missing onnxruntime means torch, with one line saying why.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from datamodules.common import ConfigError, atomic_write, cores, digest
from lightning_modules.console import notice

ENGINES = ("torch", "onnxruntime", "auto")
ONNX_DIR = Path.home() / ".cache" / "finetune-lab" / "onnx"  # exports of whole models (test and predict)
TOLERANCE = 1e-4  # max |difference| from torch on the check images
CHECK_IMAGES = 8  # the first images of the first real batch: the check costs a torch pass over these alone
BatchRunner = Callable[[torch.Tensor], torch.Tensor]  # a batch of inputs -> the outputs, by one engine


def check_engine(name: str, key: str) -> str:
    """`name` when it is one of `ENGINES`; else a ConfigError naming the config key (`feature_cache.engine`,
    `model.inference_engine`) and the choices."""
    if name not in ENGINES:
        raise ConfigError(f"{key} {name!r}: choose one of {list(ENGINES)}")
    return name


def torch_pass(module: nn.Module, device: torch.device) -> BatchRunner:
    """`module` in eval mode under inference_mode, on `device`; outputs on the CPU as float32."""

    def run(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(images.to(device)).float().cpu()

    return run


def onnx_key(module: nn.Module, example: torch.Tensor) -> str:
    """Digest of what the exported graph depends on: the module's class, its weights and buffers, the input."""
    state = module.state_dict()
    return digest(
        type(module).__qualname__,
        sorted(state),
        *(t.detach().cpu().contiguous().numpy().tobytes() for t in state.values()),
        tuple(example.shape[1:]),
        str(example.dtype),
    )


def onnxruntime_pass(module: nn.Module, example: torch.Tensor, cache_dir: Path) -> BatchRunner:
    """`module` (eval mode) exported to ONNX (cached under `cache_dir`) and run by ONNX Runtime's CPU provider with
    one intra-op thread per available core. Raises on any failure; the caller falls back."""
    import onnxruntime as ort

    path = cache_dir / f"{onnx_key(module, example)}.onnx"
    if not path.is_file():

        def export(tmp: Path) -> None:
            torch.onnx.export(
                module,
                (example[:2],),
                str(tmp),
                dynamo=True,
                input_names=["images"],
                output_names=["features"],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                external_data=False,
            )

        atomic_write(path, export, shared=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = cores()
    options.inter_op_num_threads = 1
    # no spin-waiting between batches: the loader's workers decode the next batch on the same cores (measured:
    # docs/benchmark.md, the feature pass over the dev photos)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(images: torch.Tensor) -> torch.Tensor:
        (out,) = session.run(None, {"images": images.float().cpu().contiguous().numpy()})
        return torch.from_numpy(out)

    return run


def frozen_pass(
    module: nn.Module, device: torch.device, engine: str, example: torch.Tensor, cache_dir: Path
) -> BatchRunner:
    """The forward pass of `module` (eval mode, no gradient) by `engine`: `torch`, `onnxruntime` (checked
    against torch on `example`), or `auto` (the same on CPU when onnxruntime is installed, torch otherwise and on
    GPU; the choice depends on the machine only, not on a timing, so a resumed run makes the same one).
    Whatever cannot be used falls back to torch, with one line naming why."""
    check_engine(engine, "engine")
    module.eval()
    reference = torch_pass(module, device)
    if engine == "torch" or (engine == "auto" and device.type != "cpu"):
        return reference
    if engine == "auto" and importlib.util.find_spec("onnxruntime") is None:
        return reference
    try:
        candidate = onnxruntime_pass(module, example, cache_dir)
        check = example[:CHECK_IMAGES]
        expected, got = reference(check), candidate(check)
    except Exception as err:  # onnxruntime missing, an operator the exporter cannot take ...: torch runs it
        notice(
            f"inference engine: ONNX Runtime not used ({type(err).__name__}: {str(err).splitlines()[0][:160]}); torch"
        )
        return reference
    difference = float((got - expected).abs().max())
    if difference > TOLERANCE:
        notice(f"inference engine: ONNX Runtime differs from torch by {difference:.2g} (> {TOLERANCE}); torch")
        return reference
    return candidate
