"""JPEG decoding speed on real photos: PIL, torchvision's (deprecated since 0.29) decoders and TorchCodec's,
one process, each file read from disk, the same files for each; prints images/s and the ratio to PIL.

    python scripts/benchmark_decode.py ../shared/data/cats_vs_dogs
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.images import list_images, load_image, read_rgb


def torchvision_decoders() -> dict[str, Callable[[str], Any]]:
    """torchvision's `decode_jpeg` (the path before TorchCodec) and `decode_image`."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file

    rgb = ImageReadMode.RGB
    return {
        "torchvision decode_jpeg": lambda p: decode_jpeg(read_file(p), mode=rgb, apply_exif_orientation=True),
        "torchvision decode_image": lambda p: decode_image(p, mode=rgb, apply_exif_orientation=True),
    }


def rate(decode: Callable[[str], Any], paths: list[str], repeats: int = 2) -> float:
    """Best images/s over `repeats` passes."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for path in paths:
            decode(path)
        best = max(best, len(paths) / (time.perf_counter() - start))
    return best


def main(argv: list[str] | None = None) -> None:
    """Measure and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a folder of JPEG photos (searched recursively)")
    parser.add_argument("--limit", type=int, default=1000, help="at most this many files")
    args = parser.parse_args(argv)
    paths = [str(p) for p in list_images(args.folder) if p.suffix.lower() in (".jpg", ".jpeg")][: args.limit]
    if not paths:
        raise SystemExit(f"no .jpg files under {args.folder}")
    torch.set_num_threads(1)
    from torchcodec.decoders import decode_jpeg

    decoders: dict[str, Callable[[str], Any]] = {
        "PIL (read_rgb, to an array)": lambda p: np.asarray(read_rgb(p)),
        "TorchCodec decode_jpeg": lambda p: decode_jpeg(p, mode="RGB"),  # what load_image calls
        "load_image (what the loaders call)": load_image,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        decoders.update(torchvision_decoders())
        rates = {name: rate(fn, paths) for name, fn in decoders.items()}
        reference = decoders["torchvision decode_jpeg"]
        tensors = [(t, reference(p)) for p in paths[:100] if isinstance(t := load_image(p), torch.Tensor)]
        diff = max(int((ours.int() - theirs.int()).abs().max()) for ours, theirs in tensors)
    base = rates["PIL (read_rgb, to an array)"]
    print(f"{len(paths)} JPEGs from {args.folder}, one process, torch threads 1\n")
    print("| decoder | images/s | vs PIL |\n|---|---|---|")
    for name, value in rates.items():
        print(f"| {name} | {value:.0f} | {value / base:.2f} |")
    print(f"\nTorchCodec vs torchvision decode_jpeg, first 100 files: max |pixel difference| {diff}")


if __name__ == "__main__":
    main()
