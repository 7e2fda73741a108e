"""Tasks adapted on several CPU threads at once.

A meta-batch's tasks are independent until their gradients are added, and most of a task's ops
on few-shot shapes are too small for torch's intra-op threads to pay: two cores running one task
each, one thread per op, beat two threads per op (benchmarks/results/cpu-threads-*.json), and
they degrade gracefully when another process takes a core. Torch ops release the GIL, so plain
Python threads suffice. The intra-op thread count is process-wide in torch, so it is lowered for
the duration and restored after.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch

_pools: dict[int, ThreadPoolExecutor] = {}
_lock = threading.Lock()


def auto_workers(device: torch.device) -> int:
    """One worker per intra-op thread torch would use on CPU; one on accelerators, whose
    kernels are asynchronous and already fill the device."""
    return torch.get_num_threads() if device.type == "cpu" else 1


class _Sequential:
    @staticmethod
    def map(fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        return map(fn, items)


@contextmanager
def task_threads(workers: int, parts: int) -> Iterator[Any]:
    """Something with `.map(fn, items)` (results in item order) running up to `workers` items
    at once; sequential when there is one worker or one item."""
    workers = min(workers, parts)
    if workers <= 1:
        yield _Sequential
        return
    with _lock:
        pool = _pools.get(workers) or _pools.setdefault(workers, ThreadPoolExecutor(workers))
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // workers))
    try:
        yield pool
    finally:
        torch.set_num_threads(threads)
