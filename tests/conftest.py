"""Shared fixtures: tiny data made on the fly, runs under a temporary directory, never the network; the global
torch state each test found is restored after it (tests pass alone and in the suite alike)."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub (timm does, through tests.helpers): it reads these once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers (pytest-xdist) on this 2-core machine: one
    os.environ["OMP_NUM_THREADS"] = "1"  # thread each, and for the `ftlab` children they start, instead of two
    torch.set_num_threads(1)  # threads each fighting for the cores (docs/development.md: 1.49x over one process)


@pytest.fixture(autouse=True)
def restore_torch_state() -> Iterator[None]:
    """Deterministic mode (`deterministic: warn` in the defaults turns it on for the whole process), threads and
    the default dtype, back to what they were before the test."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    dtype = torch.get_default_dtype()
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run inside a temporary directory (so `runs/` lands there) that still sees the repo's experiments/."""
    (tmp_path / "experiments").symlink_to(REPO / "experiments")
    monkeypatch.chdir(tmp_path)
    return tmp_path
