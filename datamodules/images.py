"""Reading real image files: odd modes become RGB, EXIF orientation applies, bad files are reported, not hidden.

A file that cannot be decoded never kills an epoch and is never replaced by another sample: the dataset
returns a `BadSample` in its place, the loader's collate drops it from the batch (`datamodules.batches`), and the
DataModule writes every skipped file with its reason to `bad_images.csv` in the run directory.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from pillow_heif import register_heif_opener

from datamodules.common import atomic_write

register_heif_opener()  # PIL opens HEIC/HEIF (pillow-heif); AVIF is Pillow's own
# what decoding a file can raise: an empty, cut or foreign file (OSError), a bad value inside one, too many pixels
DECODE_ERRORS = (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning)
IMAGE_EXTENSIONS = (
    *(".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"),
    *(".avif", ".heic", ".heif"),
)


class BadSample(NamedTuple):
    """A sample whose image could not be read: its path and why. (A NamedTuple: it rides in a `Batch`, which
    Lightning copies field by field when it moves a batch to the device.)"""

    path: str
    reason: str


def read_rgb(path: str | Path | BinaryIO) -> Image.Image:
    """Decode an image file (or the bytes of one, as a file object) to 8-bit RGB, applying EXIF orientation.

    Grayscale, palette, CMYK, RGBA and 16-bit images are converted; transparency is dropped.

    Raises:
        OSError: the file is empty, truncated, not an image, or larger than PIL's decompression-bomb limit.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as raw:
            raw.load()
            return to_rgb(raw)


ImageSource = str | Path | bytes | Image.Image  # a file, its bytes (an upload), or an image already opened


def load_image(source: ImageSource) -> Image.Image | torch.Tensor:
    """The one decoding of every image the models see (the loaders, `Predictor`, `ftlab serve`): a file, the bytes
    of one or a PIL image to 8-bit RGB with EXIF orientation applied. Baseline RGB or grayscale JPEGs are decoded by
    TorchCodec (libjpeg-turbo) straight to a (3, H, W) uint8 tensor, skipping PIL's decode and the PIL-to-tensor
    copy (measured by `scripts/benchmark_decode.py`); anything else, or a file that decoder refuses (truncated),
    goes through PIL (`read_rgb`, `to_rgb`), which reports the problem.

    Raises:
        OSError: the file is empty, truncated, not an image, or larger than PIL's decompression-bomb limit.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    opened = io.BytesIO(source) if isinstance(source, bytes) else source
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(opened) as raw:  # header only: format, mode and the decompression-bomb check
            plain_jpeg = raw.format == "JPEG" and raw.mode in ("RGB", "L")
    if plain_jpeg:
        from torchcodec.decoders import decode_jpeg  # it loads its FFmpeg libraries: at the first JPEG, not at start-up

        try:
            decoded = decode_jpeg(source if isinstance(source, bytes) else str(source), mode="RGB")
            return decoded  # type: ignore[return-value]  # one source, one tensor
        except RuntimeError:  # "Image is incomplete or truncated": let PIL say what is wrong
            pass
    return read_rgb(io.BytesIO(source) if isinstance(source, bytes) else source)


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert any mode (16-bit, palette, CMYK, RGBA ...) to 8-bit RGB."""
    img: Image.Image = ImageOps.exif_transpose(image)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bits, not clip
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def check_header(path: str | Path) -> str | None:
    """Cheap check at scan time (header only): None if the file looks like an image, else the reason."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.size  # noqa: B018 - parsing the header is the check
    except DECODE_ERRORS as err:
        return bad_reason(err)
    return None


def bad_reason(err: BaseException) -> str:
    """A short human reason for a decoding error."""
    if isinstance(err, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return f"too many pixels (decompression-bomb limit): {err}"
    if isinstance(err, UnidentifiedImageError):
        return "not an image PIL can identify"
    return f"{type(err).__name__}: {err}"


# A file name that is not UTF-8 (bytes from another system) is written back byte for byte, so the path in a CSV
# opens the file; such a CSV reads back with the same `errors`.
PATH_ERRORS = "surrogateescape"


# never data: Python's byte-code cache, the resource forks of a zip archive made on macOS
SKIPPED_FOLDERS = ("__pycache__", "__MACOSX")


def skipped_folder(name: str) -> bool:
    """True for a folder that never holds data: hidden (`.ipynb_checkpoints`, `.git`) or `SKIPPED_FOLDERS`."""
    return name.startswith(".") or name in SKIPPED_FOLDERS


def list_images(folder: Path, others: Counter[str] | None = None) -> list[Path]:
    """Image files under `folder`, sorted; hidden files and `skipped_folder`s (`.ipynb_checkpoints`, `__pycache__`)
    skipped. Symlinked folders are followed, each real folder read once (a link back up the tree is not a loop).
    Files of other extensions are left out and, with `others`, counted by extension (`.txt`, `.db`, or `(none)`)."""
    found = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # reached again through a link: its files are listed already
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not skipped_folder(d))
        for name in filenames:
            if name.startswith("."):
                continue
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath) / name)
            elif others is not None:
                others[Path(name).suffix.lower() or "(none)"] += 1
    return sorted(found)


def write_bad_images(path: Path, rows: Sequence[tuple[str, str, str]]) -> None:
    """Merge `(split, path, reason)` rows into the CSV at `path`, written atomically (temp file, then rename)."""
    merged = set(rows)
    if path.is_file():
        with path.open(newline="", errors=PATH_ERRORS) as f:
            merged |= {(r["split"], r["path"], r["reason"]) for r in csv.DictReader(f)}

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", errors=PATH_ERRORS) as f:
            writer = csv.writer(f)
            writer.writerow(["split", "path", "reason"])
            writer.writerows(sorted(merged))

    atomic_write(path, write)
