"""Test helpers, by kind: `data` (tiny data in the real formats), `models` (tiny models, a quiet Trainer), `runs`
(`ftlab` from a test), `faults` (callbacks that inject faults into runs). Test modules import from these, never
from another test module or a conftest."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
