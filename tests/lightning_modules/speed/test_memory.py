"""The allocator setting (`speed.memory`), measured on the real allocator: page faults of a loop that allocates
and frees 64 MB tensors, as a training step does, in a fresh process with and without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_modules.speed import memory
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
ROUND_PAGES = (64 << 20) // 4096  # the 4 KB pages of one 64 MB tensor, each faulted in when it comes from a fresh mmap
HUGE_PAGES = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _round_trips(**env: str) -> dict[str, int]:
    clean = {k: v for k, v in os.environ.items() if k not in (*memory.GLIBC_SETTINGS, "GLIBC_TUNABLES", memory.OFF)}
    child = subprocess.run(
        [sys.executable, "-c", CHILD],
        env={**clean, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, int] = json.loads(child.stdout.splitlines()[-1])
    return result


@pytest.mark.slow
@pytest.mark.skipif(not memory.glibc(), reason="glibc's allocator only")
@pytest.mark.skipif("LD_PRELOAD" in os.environ, reason="another allocator may be preloaded in glibc's place")
@pytest.mark.skipif(
    HUGE_PAGES.is_file() and "[always]" in HUGE_PAGES.read_text(), reason="2 MB pages: other fault counts"
)
def test_freed_memory_is_reused_instead_of_faulted_in_again() -> None:
    kept = _round_trips()
    assert kept["applied"] and kept["faults"] < 2 * ROUND_PAGES, kept  # the heap's blocks reused (one round at most)
    glibc_default = _round_trips(**{memory.OFF: "0"})
    assert not glibc_default["applied"] and glibc_default["faults"] >= 6 * ROUND_PAGES, glibc_default
    user_tuned = _round_trips(MALLOC_TRIM_THRESHOLD_="1000000000")  # the user's own setting is left as it is
    assert not user_tuned["applied"]


@pytest.mark.parametrize(
    ("env", "tuned"),
    [
        ({}, False),
        ({"MALLOC_MMAP_MAX_": "65536"}, True),
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"}, True),
        ({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=2048"}, False),  # a container's, not the allocator's
    ],
)
def test_the_users_own_malloc_settings_are_recognised(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], tuned: bool
) -> None:
    for name in (*memory.GLIBC_SETTINGS, "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert memory.user_tuned() is tuned


@pytest.mark.parametrize("value", ["0", "false", "OFF", "no "])
def test_the_switch_turns_it_off_in_any_usual_spelling(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(memory.OFF, value)
    memory.keep_freed_memory.cache_clear()
    try:
        assert memory.keep_freed_memory() is False
    finally:
        memory.keep_freed_memory.cache_clear()  # the next call in this process decides afresh
