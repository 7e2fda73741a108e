"""Keep freed CPU memory in the process instead of returning it to the kernel.

glibc serves large blocks (mini-ImageNet activations are 30-100 MB each) with fresh mmaps and
unmaps them on free, so every such tensor an op allocates page-faults all of its pages in
again. Serving them from the heap and never trimming it makes the process's memory a cache, as
torch's CUDA allocator is; the price is that RSS stays at its peak.

That peak is per glibc arena, and every thread that allocates gets an arena of its own: task
threads and the data prefetcher would each keep the peak of their own work beside the training
heap. With one shared arena they reuse the training heap instead, which lowers the peak and
speeds up large-image work; threads running small ops contend for it, so engine/fast_paths.py
asks for it for large images only. The measurements: benchmarks/README.md, "Measurements
behind the engine's defaults".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_done = False


def _mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


def retain_freed_memory(shared_arena: bool = False) -> bool:
    """Tell glibc malloc to stop using mmap and never trim the heap (idempotent), and whether
    threads that allocate from now on share the main arena (else glibc's default limit, 8
    arenas per core). Returns whether it took effect (False off glibc, e.g. macOS or musl)."""
    global _done
    mallopt = _mallopt()
    if mallopt is None:
        return False
    if not _done:
        _done = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    arenas = 1 if shared_arena else 8 * (os.cpu_count() or 1)
    return _done and bool(mallopt(_M_ARENA_MAX, arenas))
