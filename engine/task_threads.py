"""Tasks adapted on several CPU threads at once.

A meta-batch's tasks are independent until their gradients are added, and most of a task's ops
on few-shot shapes are too small for torch's intra-op threads to pay: two cores running one task
each, one thread per op, beat two threads per op (benchmarks/results/cpu-threads-*.json), and
they degrade gracefully when another process takes a core. Torch ops release the GIL, so plain
Python threads suffice. The intra-op thread count is process-wide in torch, so it is lowered for
the duration and restored after. A task thread never touches a leaf tensor that requires grad
(meta_batch gives them views made on the calling thread: engine/meta_batch.py `_aliased`
explains the deadlock this avoids).

Every other thread the engine starts that runs torch ops (the data prefetcher) runs them on one
intra-op thread (`start_worker_thread`). Why: with OpenMP (libgomp, torch's CPU builds) each
thread that runs a parallel op gets a team of its own, and once the process has more OpenMP
threads than cores, libgomp makes every team stop spin-waiting between parallel regions, so the
training thread's many small parallel ops each wait for its workers to wake up. One background
thread that had run a single parallel op slowed a plain omniglot-5w1s second-order step by
10-25% (benchmarks/background_thread.py).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch

_pools: dict[tuple[int, str, int], ThreadPoolExecutor] = {}
_lock = threading.Lock()


def shared_pool(name: str, workers: int) -> ThreadPoolExecutor:
    """The process's pool `name` of `workers` threads, made on first use and kept. Per process
    id: a forked child has none of its parent's threads, so work queued on the pool object it
    copied would wait for ever. Per name: a pool's threads may wait on another pool's work
    (task threads on the helpers of `run_split`), never on their own pool's."""
    key = (os.getpid(), name, workers)
    with _lock:
        if key not in _pools:
            _pools[key] = ThreadPoolExecutor(workers, thread_name_prefix=f"mamlpp-{name}")
        return _pools[key]


def helper_pool() -> ThreadPoolExecutor:
    """The threads that take the other parts of a `run_split` call (the caller takes the
    first). They run only such parts and never wait on other work."""
    return shared_pool("helpers", max(1, (os.cpu_count() or 2) - 1))


def run_split(count: int, call: Callable[[int, int], object], split: bool,
              helpers: Callable[[], ThreadPoolExecutor] = helper_pool) -> None:
    """Run `call(a, b)` over [0, count): where `split` (the work is large enough to repay the
    hand-off), cut into as many contiguous ranges as the calling thread's torch intra-op count,
    the caller taking the first and `helpers()` the others (task threads of a two-core machine
    run with one, so they never split). For work whose parts are independent (engine/fused_cpu.py's
    channels, engine/fft_conv.py's images): the results are the same however it is cut."""
    parts = min(torch.get_num_threads(), count) if split else 1
    if parts <= 1:
        call(0, count)
        return
    bounds = [count * i // parts for i in range(parts + 1)]
    pool = helpers()
    others = [pool.submit(call, bounds[i], bounds[i + 1]) for i in range(1, parts)]
    call(bounds[0], bounds[1])
    for done in others:
        done.result()


def auto_workers(device: torch.device) -> int:
    """One worker per intra-op thread torch would use on CPU; one on accelerators, whose
    kernels are asynchronous and already fill the device."""
    return torch.get_num_threads() if device.type == "cpu" else 1


def start_worker_thread(target: Callable[[], Any], name: str) -> threading.Thread:
    """Start a daemon thread whose torch ops run on one intra-op thread (see above).

    `torch.set_num_threads` sets the calling thread's OpenMP thread count and a process-wide
    default that a thread takes at its first torch call; so each side makes that call first
    (the caller's count and the worker's are settled), then the worker takes one thread and the
    caller puts the default back."""
    threads = torch.get_num_threads()
    ready = threading.Event()

    def run() -> None:
        torch.get_num_threads()  # torch's per-thread setup first: it would reapply the default
        torch.set_num_threads(1)
        ready.set()
        target()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    ready.wait()
    torch.set_num_threads(threads)
    return thread


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
    pool = shared_pool("tasks", workers)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // workers))
    try:
        yield pool
    finally:
        torch.set_num_threads(threads)
