"""The C allocator on Linux (glibc): keep freed memory for the next step instead of handing it back to the kernel.

By default glibc serves every allocation above a moving threshold (at most 32 MB) with its own `mmap`, unmaps it
when it is freed, and trims the top of its heap once twice that lies free. A training step on a CPU allocates and
frees activations and gradients of tens of MB each, so every step asks the kernel for fresh pages and faults each
one in, zeroed: in a fit of the own-images recipe on this 2-core machine, 22 million minor page faults and 42 s of
system time in a 59 s run (docs/performance.md, "The allocator"). With no chunk served by `mmap` and no trimming,
freed blocks are reused: 2.5 to 2.6 million faults, 19 to 23 s, the run 1.14 to 1.30x faster, its peak memory 4 to 8%
higher.

Applied once per process, for the rest of it, when a model is set up (`FineTuneModule.configure_model`: the CLI,
the Python API and a notebook kernel alike); DataLoader workers forked later inherit it (workers started by `spawn`
or `forkserver` run with glibc's defaults). `FTLAB_KEEP_FREED_MEMORY=0` (or `false`, `off`, `no`) leaves glibc as it
is. Also left alone: a process where the user set glibc's own malloc variables (`MALLOC_MMAP_MAX_`,
`MALLOC_TRIM_THRESHOLD_`, `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TOP_PAD_`, a `glibc.malloc.*` entry of `GLIBC_TUNABLES`;
any of them also freezes glibc's moving threshold at 128 KB, which measured 1.6x slower than its default here),
another C library or OS. An allocator preloaded in glibc's place (jemalloc, tcmalloc) ignores it.
"""

from __future__ import annotations

import ctypes
import functools
import os

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_MAX = -4
OFF = "FTLAB_KEEP_FREED_MEMORY"  # "0": leave glibc as it is
KEEP_UP_TO = 2**31 - 1  # the largest trim threshold mallopt takes (an int): free heap top kept up to 2 GB
GLIBC_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
OFF_VALUES = ("0", "false", "off", "no")


def glibc() -> bool:
    """Whether this process runs on glibc (Linux's usual C library; not musl, macOS or Windows)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (AttributeError, ValueError, OSError):  # no confstr, or no such name on this system
        return False


def user_tuned() -> bool:
    """Whether the user set glibc's malloc parameters themselves (its variables, or its malloc tunables)."""
    return any(name in os.environ for name in GLIBC_SETTINGS) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")


@functools.cache
def keep_freed_memory() -> bool:
    """Tell glibc to serve no allocation by `mmap` and to keep its free heap top (up to `KEEP_UP_TO`), once per
    process; whether it was applied (False: turned off, not glibc, or the user set glibc's own variables)."""
    if os.environ.get(OFF, "").strip().lower() in OFF_VALUES or not glibc() or user_tuned():
        return False
    libc = ctypes.CDLL(None)  # the process's own symbols: glibc's mallopt
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_UP_TO))
