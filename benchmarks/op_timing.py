"""One op's time: the best of several repeats of a few back-to-back calls, after untimed
warm-up calls (allocator and first-call setup)."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_ms(f: Callable[[], object], repeats: int = 5, warmup: int = 2, calls: int = 3) -> float:
    """Milliseconds per call of f, the best of `repeats` timings of `calls` calls each."""
    for _ in range(warmup):
        f()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            f()
        best = min(best, (time.perf_counter() - t0) / calls)
    return round(best * 1e3, 3)
