"""The frozen backbone's forward pass, torch against ONNX Runtime (`feature_cache.engine`), per backbone.

    .venv/bin/python scripts/benchmark_engines.py [--batch 32] [--size 224]

Each backbone (random weights, except EfficientNet-Lite0's embedded ImageNet ones) runs a batch in eval mode:
torch in channels-last under inference_mode, ONNX Runtime on the exported graph with one thread per core. Prints
images per second (best of `--repeats`), the ratio, the export time and the largest difference.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from lightning_modules.backbones import build_backbone
from lightning_modules.engines import Pass, cores, onnxruntime_pass, torch_pass

BACKBONES = (
    ("timm/efficientnet_lite0", "embedded"),
    ("torchvision/mobilenet_v2", "none"),
    ("torchvision/resnet18", "none"),
)


def rate(run: Pass, images: torch.Tensor, repeats: int) -> float:
    """Images per second of `run` on `images`, the best of `repeats` after one warm-up."""
    run(images)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(images)
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"| backbone | torch img/s | ONNX Runtime img/s | ratio | export s | max diff |  ({cores()} cores)")
    print("|---|---|---|---|---|---|")
    for name, weights in BACKBONES:
        backbone = build_backbone(name, weights, args.size, 3).eval().to(memory_format=torch.channels_last)
        images = torch.rand(args.batch, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
        by_torch = torch_pass(backbone, torch.device("cpu"))
        start = time.perf_counter()
        by_ort = onnxruntime_pass(backbone, images, Path(tempfile.mkdtemp()))
        export_s = time.perf_counter() - start
        diff = float((by_torch(images) - by_ort(images)).abs().max())
        t, o = rate(by_torch, images, args.repeats), rate(by_ort, images, args.repeats)
        print(f"| {name} | {t:.0f} | {o:.0f} | {o / t:.2f} | {export_s:.1f} | {diff:.1g} |", flush=True)


if __name__ == "__main__":
    main()
