"""Threads the engine starts run their torch ops without an OpenMP team of their own.

With more OpenMP threads than cores, libgomp stops every team spin-waiting, which slowed the
training thread's small parallel ops (benchmarks/background_thread.py measures it). What is
checked here is the cause, in threads the kernel counts: a plain thread that runs a parallel
op adds a worker thread to the process; one from start_worker_thread, or the data
prefetcher, adds none, and the caller keeps its own intra-op thread count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, os, threading, time
import torch
torch.set_num_threads(2)
torch.ones(1 << 20).mul_(2).sum()          # the main thread's own team exists first
def threads():
    return len(os.listdir("/proc/self/task"))
out = {"main_before": torch.get_num_threads()}
seen = {}
alive = threading.Event()
def op(key):
    def run():
        seen[key] = torch.get_num_threads()
        torch.ones(1 << 20).mul_(2).sum()
        seen[key + "_done"] = True
        alive.wait()
    return run
def settle(key):
    while not seen.get(key + "_done"):
        time.sleep(0.01)
    time.sleep(0.2)

from engine.task_threads import start_worker_thread
base = threads()
start_worker_thread(op("worker"), "w")
settle("worker")
out["worker_added"] = threads() - base - 1  # the worker itself
out["main_after_worker"] = torch.get_num_threads()

base = threads()
threading.Thread(target=op("plain"), daemon=True).start()
settle("plain")
out["plain_added"] = threads() - base - 1

from engine.bench import synthetic_dataset
from engine.config import resolve
from engine.data import Prefetcher, sampler_for
cfg = resolve("omniglot-5w1s")
sampler = sampler_for(cfg, "train", synthetic_dataset(cfg))
base = threads()
prefetcher = Prefetcher(sampler, 0, 8, 10)
next(iter(prefetcher))                      # it assembled batches and waits on a full queue
time.sleep(0.3)
out["prefetcher_added"] = threads() - base - 1  # the prefetcher itself
prefetcher.close()
out["main_after_prefetcher"] = torch.get_num_threads()

out["seen"] = {k: v for k, v in seen.items() if not k.endswith("_done")}
alive.set()
print(json.dumps(out))
"""


def test_engine_threads_make_no_openmp_team(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2",
               MAMLPP_HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["main_before"] == 2
    assert out["seen"]["worker"] == 1 and out["worker_added"] == 0, out
    assert out["prefetcher_added"] == 0, out
    assert out["main_after_worker"] == out["main_after_prefetcher"] == 2, out
    # the mechanism itself: a plain thread's parallel op brings a worker thread with it
    assert out["seen"]["plain"] == 2 and out["plain_added"] >= 1, out
