"""One-time pre-resize of an image folder to the training size (the command: `scripts/preresize.py`)."""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from PIL import Image

from datamodules.common import atomic_write, progress
from datamodules.images import list_images, read_rgb, to_rgb


def preresize_file(src: Path, dst: Path, size: int, quality: int = 95) -> str:
    """Write `src` with its shorter side at most `size` to `dst`; 'resized', 'copied' (unreadable) or 'done'."""
    if dst.is_file() and dst.stat().st_mtime_ns >= src.stat().st_mtime_ns:
        return "done"
    try:
        with Image.open(src) as raw:
            fmt = raw.format or "PNG"
        image = _read_draft(src, size) if fmt == "JPEG" else read_rgb(src)
        scale = size / min(image.size)
        if scale < 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
        options = {"quality": quality} if fmt == "JPEG" else {}
        atomic_write(dst, lambda tmp: image.save(tmp, format=fmt, **options), durable=False)  # a cache: rebuildable
        return "resized"
    except (OSError, ValueError, Image.DecompressionBombError):
        atomic_write(dst, lambda tmp: shutil.copy2(src, tmp), durable=False)  # the run reports it, with the reason
        return "copied"


def _read_draft(path: Path, size: int) -> Image.Image:
    with Image.open(path) as raw:
        raw.draft("RGB", (size, size))  # decode at 1/2, 1/4 or 1/8 scale while still >= size
        raw.load()
        return to_rgb(raw)


def preresize(src: Path, dst: Path, size: int, workers: int | None = None, shown: bool = True) -> dict[str, int]:
    """Pre-resize every image under `src` into `dst`; counts by outcome. `shown`: a progress line on stderr."""
    if not src.is_dir():
        raise SystemExit(f"error: {src} is not a folder of images")
    if dst.resolve() == src.resolve():
        raise SystemExit("error: the destination must differ from the source (the originals are kept)")
    files = list_images(src)
    counts = {"resized": 0, "copied": 0, "done": 0}
    with (
        ProcessPoolExecutor(workers or os.cpu_count()) as pool,
        progress("preresize", "image", len(files), shown=shown) as bar,
    ):
        jobs = [pool.submit(preresize_file, f, dst / f.relative_to(src), size) for f in files]
        for job in as_completed(jobs):
            counts[job.result()] += 1
            bar.update()
    return counts
