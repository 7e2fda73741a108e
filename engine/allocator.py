"""Keep freed CPU memory in the process instead of returning it to the kernel.

glibc serves large blocks (mini-ImageNet activations are 30-100 MB each) with fresh mmaps and
unmaps them on free, so every such tensor an op allocates page-faults all of its pages in
again: on the 2-core benchmark machine that made zero-filling a 34 MB gradient take 20 ms and
mini-ImageNet validation 1.6x slower. Serving them from the heap and never trimming it makes the
process's memory a cache, as torch's CUDA allocator is; the price is that RSS stays at its peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_done = False


def retain_freed_memory() -> bool:
    """Tell glibc malloc to stop using mmap and never trim the heap (idempotent). Returns
    whether it took effect (False off glibc, e.g. macOS or musl)."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    _done = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _done
