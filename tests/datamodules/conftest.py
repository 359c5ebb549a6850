"""Fixtures of the data tests: an image folder with planted faults (the writers are in tests/helpers/data.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.data import photo, write_class_folders


@pytest.fixture
def faulty_folder(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """An image folder with planted faults. Returns the root and {file name: expected fate}."""
    root = tmp_path / "faulty"
    write_class_folders(root, {"cat": 6, "dog": 6})
    fates = {}
    (root / "cat" / "zero.jpg").write_bytes(b"")
    fates["zero.jpg"] = "bad"
    buf = io.BytesIO()
    photo(100, (64, 64)).save(buf, format="JPEG")
    (root / "cat" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    fates["truncated.jpg"] = "bad"
    (root / "dog" / "not_an_image.jpg").write_text("this is text, not a JPEG")
    fates["not_an_image.jpg"] = "bad"
    photo(101, mode="CMYK").save(root / "dog" / "cmyk.jpg", format="JPEG")
    fates["cmyk.jpg"] = "good"
    photo(102, mode="RGBA").save(root / "dog" / "rgba_png_named.jpg", format="PNG")
    fates["rgba_png_named.jpg"] = "good"
    photo(103, mode="L").save(root / "cat" / "gray.png")
    fates["gray.png"] = "good"
    Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)).save(root / "cat" / "sixteen_bit.png")
    fates["sixteen_bit.png"] = "good"
    photo(104).convert("P").save(root / "dog" / "palette.png")
    fates["palette.png"] = "good"
    (root / "cat" / "Thumbs.db").write_bytes(b"\x00" * 64)
    (root / "dog" / ".DS_Store").write_bytes(b"\x00" * 64)
    (root / "cat" / ".ipynb_checkpoints").mkdir()
    photo(105).save(root / "cat" / ".ipynb_checkpoints" / "img_0-checkpoint.jpg")
    return root, fates
