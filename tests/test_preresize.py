"""scripts/preresize.py: a smaller copy of an image folder, same layout, unreadable files kept for the report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import REPO
from tests.helpers.data import photo


def _run(src: Path, dst: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(REPO / "scripts" / "preresize.py"), str(src), str(dst), "--size", "64", "--workers", "1"]
    return subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=300, check=True)


@pytest.mark.slow
def test_preresize_copies_the_layout_at_the_training_size(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "cat").mkdir(parents=True)
    (src / "dog" / ".ipynb_checkpoints").mkdir(parents=True)
    photo(1, size=(400, 300)).save(src / "cat" / "big.jpg", quality=95)
    photo(2, size=(50, 40)).save(src / "cat" / "small.png")
    photo(3, size=(300, 600)).save(src / "dog" / "tall.jpg")
    (src / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    (src / "dog" / "Thumbs.db").write_bytes(b"\0" * 10)
    photo(4).save(src / "dog" / ".ipynb_checkpoints" / "hidden.jpg")

    first = _run(src, dst)
    assert "3 resized, 1 unreadable copied" in first.stdout
    last = first.stderr.splitlines()[-1]  # the progress line as it closed: the images done of all, and the rate
    assert last.startswith("preresize: 100%") and "4/4 [" in last and "image/s]" in last, first.stderr
    with Image.open(dst / "cat" / "big.jpg") as big, Image.open(dst / "dog" / "tall.jpg") as tall:
        assert (big.size, big.format, tall.size) == ((85, 64), "JPEG", (64, 128))
    with Image.open(dst / "cat" / "small.png") as small:
        assert (small.size, small.format) == ((50, 40), "PNG")  # never enlarged
    assert (dst / "dog" / "broken.jpg").read_bytes() == b"not a jpeg"  # the run's bad_images.csv will list it
    assert not (dst / "dog" / "Thumbs.db").exists() and not (dst / "dog" / ".ipynb_checkpoints").exists()
    again = _run(src, dst, "--no-progress")
    assert "0 resized, 0 unreadable copied as they are, 4 already done" in again.stdout  # resumable
    assert "preresize:" not in again.stderr
