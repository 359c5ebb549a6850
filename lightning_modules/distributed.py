"""Gathering Python objects across DDP processes (a no-op on one process)."""

from __future__ import annotations

from typing import Any


def gather_lists(items: list[Any]) -> list[Any]:
    """The concatenation, in rank order, of every process's `items` (every process must call it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(items)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]
