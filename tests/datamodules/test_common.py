"""The neutral helpers both packages use: atomic writes, generated pages that keep their hand-written part."""

from __future__ import annotations

from pathlib import Path

import pytest

from datamodules.common import HAND_WRITTEN, atomic_write, write_generated


def test_atomic_write_leaves_the_old_file_whole_when_the_writer_fails(tmp_path: Path) -> None:
    path = tmp_path / "report.md"
    path.write_text("old")

    def fails(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fails)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]  # no partial file left behind


def test_a_generated_page_keeps_what_was_written_by_hand(tmp_path: Path) -> None:
    page = tmp_path / "benchmark.md"
    write_generated(page, "table 1\n")
    assert page.read_text() == "table 1\n"  # nothing by hand yet: the text alone
    page.write_text(page.read_text() + f"\n{HAND_WRITTEN}\n\n## Decoding\n\n2026-12-01: 1,028 img/s\n")
    write_generated(page, "table 2\n")
    assert page.read_text() == f"table 2\n\n{HAND_WRITTEN}\n\n## Decoding\n\n2026-12-01: 1,028 img/s\n"
