"""Keep the memory a process frees for its next step, instead of handing it back to the OS (glibc).

Why: a step allocates and frees the same large buffers every time (a worker's
received parameters, a server's reply snapshot and sum of gradients). glibc
maps a block over its mmap threshold afresh and unmaps it when freed, and
gives the top of its heap back once enough of it is free, so each step's
buffers come back as new pages: a page fault for every 4 KiB touched. With
the threshold at glibc's largest (32 MiB on 64-bit) and no trimming, a freed
buffer is reused as it is. PyTorch's CPU tuning guide gets the same from
jemalloc or tcmalloc (LD_PRELOAD); this needs no other library. The cost: a
process's resident memory stays at its peak, as a CUDA caching allocator's
does. `SHOAL_MALLOC=default` leaves glibc's settings alone; elsewhere than
glibc nothing changes. Measured in docs/benchmarks-ps.md ("Page faults").
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

from shoal import env
from shoal.errors import ConfigError

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20
"""glibc's largest mmap threshold on 64-bit (HEAP_MAX_SIZE / 2): blocks up to this come from the heap."""
TRIM_NEVER = (1 << 31) - 1
"""The largest trim threshold mallopt takes (an int): the heap's free top is kept."""

_done: bool | None = None


def setting(environ: Mapping[str, str] | None = None) -> str:
    """SHOAL_MALLOC, checked (the launchers check it before they start anything): 'keep' or 'default'."""
    how = (os.environ if environ is None else environ).get(env.MALLOC, "keep")
    if how not in ("keep", "default"):
        raise ConfigError(f"{env.MALLOC} must be 'keep' (the default) or 'default' (glibc's own), not {how!r}")
    return how


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep what it frees (once per process); whether it did."""
    global _done
    if _done is None:
        _done = _set() if setting() == "keep" else False
    return _done


def _set() -> bool:
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (or no C library to ask): its defaults stay
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_NEVER))
