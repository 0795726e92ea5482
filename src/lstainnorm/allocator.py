"""CPU memory allocator settings for eager training.

Eager PyTorch allocates every intermediate image afresh. glibc serves allocations above its
mmap threshold (128 KB, growing with use) with fresh pages from the kernel and returns them
on free, so each colour-space step of a batch of tiles pays its page faults again (the largest
cost of the eager fusion in a profile on this project's 2-core CPU; compare a run with
``LSTAINNORM_MALLOC=default``). :func:`keep_freed_pages`
keeps them: allocations up to 32 MB come from the heap and freed memory stays with the process.

``lstainnorm`` commands call it; a library user opts in (it is process-wide), or sets
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296`` before starting Python.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_freed_pages", "MMAP_THRESHOLD"]

# glibc's largest mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX).
MMAP_THRESHOLD = 32 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_done: list[bool] = []


def keep_freed_pages() -> bool:
    """Set glibc's mmap threshold to 32 MB and stop it trimming the heap (Linux/glibc only).

    Returns whether the settings took effect (False elsewhere, or with ``LSTAINNORM_MALLOC=default``
    in the environment). Calling it again does nothing. Memory the process freed is reused
    rather than returned to the system, so its resident size stays at its peak.
    """
    if _done:
        return _done[0]
    ok = False
    if sys.platform.startswith("linux") and os.environ.get("LSTAINNORM_MALLOC", "") != "default":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                libc.mallopt(_M_TRIM_THRESHOLD, 1 << 31)
            )
        except (OSError, AttributeError):  # not glibc (musl has no mallopt)
            ok = False
    _done.append(ok)
    return ok
