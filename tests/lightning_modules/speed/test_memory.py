"""The allocator setting (`speed.memory`), measured on the real allocator: page faults of a loop that allocates
and frees 64 MB tensors, as a training step does, in a fresh process with and without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lightning_modules.speed.memory import GLIBC_SETTINGS, OFF, glibc
from tests.helpers import REPO

# In a fresh process: the setting (or not), then 8 rounds of a 64 MB tensor filled and freed; the minor page faults
# of the last 7 rounds (the first may fault in the heap it then keeps).
CHILD = """
import json, resource, torch
from lightning_modules.speed.memory import keep_freed_memory
applied = keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(16 << 20)
before = faults()
for _ in range(7):
    torch.ones(16 << 20).add_(1)
print(json.dumps({"applied": applied, "faults": faults() - before}))
"""
ROUND_PAGES = (64 << 20) // 4096  # the pages of one 64 MB tensor, each faulted in when it comes from a fresh mmap


def _round_trips(**env: str) -> dict[str, int]:
    clean = {k: v for k, v in os.environ.items() if k not in (*GLIBC_SETTINGS, OFF)}
    child = subprocess.run(
        [sys.executable, "-c", CHILD],
        env={**clean, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, int] = json.loads(child.stdout.splitlines()[-1])
    return result


@pytest.mark.skipif(not glibc(), reason="glibc's allocator only")
def test_freed_memory_is_reused_instead_of_faulted_in_again() -> None:
    kept = _round_trips()
    assert kept["applied"] and kept["faults"] < 2 * ROUND_PAGES, kept  # the heap's blocks reused (one round at most)
    glibc_default = _round_trips(**{OFF: "0"})
    assert not glibc_default["applied"] and glibc_default["faults"] >= 6 * ROUND_PAGES, glibc_default
    user_tuned = _round_trips(MALLOC_TRIM_THRESHOLD_="1000000000")  # the user's own setting is left as it is
    assert not user_tuned["applied"]
