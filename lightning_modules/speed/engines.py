"""Inference engines for passes where no gradient flows (the feature cache's pass over a frozen backbone):
torch, or ONNX Runtime on CPU, where depthwise-convolution backbones run several times faster.

An ONNX Runtime pass is the module exported once (dynamo exporter, dynamic batch), kept on disk under a key of
its weights and input shape, and checked against torch on a real batch before it is used: a difference above
`TOLERANCE`, a failed export or a missing onnxruntime means torch, with one line saying why.
"""

from __future__ import annotations

import functools
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


# `auto` on CPU: the backbone families on which ONNX Runtime beat torch in scripts/benchmark.py (the frozen forward
# pass, 12 batches of 32 at 224 px, this 2-core machine, docs/benchmark.md): family name prefix -> times faster.
# Any other family (not measured: ViT, ConvNeXt, the scratch baselines) and any GPU run on torch.
ONNX_WINS = {"efficientnet": 3.8, "tf_efficientnet": 4.1, "mobilenet": 4.0, "resnet": 1.5}
# A whole model is exported for each checkpoint tested (the frozen backbone's export is kept for every later run):
# about 7 s for Lite0 here, paid back at (1/71 - 1/269) s an image from about 700 images; below this, torch.
AUTO_MIN_IMAGES = 1000


def auto_engine(backbone: str, device: torch.device, images: int | None = None) -> tuple[str, str]:
    """What `auto` runs `backbone` (`timm/efficientnet_lite0`, `torchvision/resnet18` ...) on, and why: ONNX Runtime
    on a CPU for the families of `ONNX_WINS` when it is installed, torch otherwise; `images`: how many the pass
    will see, when the export is paid for this pass alone (a whole model tested), below `AUTO_MIN_IMAGES` torch.
    A rule of the name and the machine, not a timing: a resumed run chooses the same."""
    arch = backbone.rpartition("/")[2].removeprefix("hf-hub:").lower()
    family = next((f for f in sorted(ONNX_WINS, key=len, reverse=True) if arch.startswith(f)), None)
    if device.type != "cpu":
        return "torch", f"{device.type}: torch"
    if family is None:
        return "torch", f"{backbone}: ONNX Runtime not measured on this family; torch"
    if importlib.util.find_spec("onnxruntime") is None:
        return "torch", f"{backbone}: onnxruntime is not installed (pip install onnxruntime); torch"
    if images is not None and images < AUTO_MIN_IMAGES:
        return "torch", f"{images} images do not pay for a model export (from {AUTO_MIN_IMAGES}); torch"
    return "onnxruntime", f"{backbone} on CPU: ONNX Runtime ({ONNX_WINS[family]:g}x torch on {family} here)"


def chosen_engine(engine: str, backbone: str, device: torch.device, what: str, images: int | None = None) -> str:
    """`engine`, or for `auto` the one `auto_engine` picks, said once in a console line naming `what` runs."""
    if engine != "auto":
        return engine
    picked, why = auto_engine(backbone, device, images)
    _say_once(f"{what}: engine auto -> {picked} ({why})")
    return picked


@functools.cache
def _say_once(line: str) -> None:
    notice(line)


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


def write_onnx(module: nn.Module, example: torch.Tensor, path: Path, output: str) -> None:
    """`module` to an ONNX file at `path`: the dynamo exporter (its graph optimised: unoptimised, Lite0 ran 3.6x
    slower on ONNX Runtime here), input `images` with a dynamic batch, one output named `output`, weights inside;
    quiet (the exporter's own step lines would break the progress line)."""
    torch.onnx.export(
        module,
        (example,),
        str(path),
        dynamo=True,
        verbose=False,
        input_names=["images"],
        output_names=[output],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        external_data=False,
    )


def onnxruntime_pass(module: nn.Module, example: torch.Tensor, cache_dir: Path) -> BatchRunner:
    """`module` (eval mode) exported to ONNX (cached under `cache_dir`) and run by ONNX Runtime's CPU provider with
    one intra-op thread per available core. Raises on any failure; the caller falls back."""
    import onnxruntime as ort

    path = cache_dir / f"{onnx_key(module, example)}.onnx"
    if not path.is_file():
        atomic_write(path, lambda tmp: write_onnx(module, example[:2], tmp, "features"), shared=True)
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
    """The forward pass of `module` (eval mode, no gradient) by `engine`: `torch` or `onnxruntime` (checked
    against torch on `example`; `auto` is resolved before, by `chosen_engine`). Whatever cannot be used falls back
    to torch, with one line naming why."""
    check_engine(engine, "engine")
    module.eval()
    reference = torch_pass(module, device)
    if engine != "onnxruntime":
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
