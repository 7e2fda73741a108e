"""Speed and memory of the engine on synthetic tasks shaped like a preset (`mamlpp bench`).

Per preset and meta-batch implementation (loop | vmap) this measures, in a fresh process so that
peak memory figures do not mix:

- seconds per meta-iteration, first and second order, at MSL epoch 0 (every step's query loss
  counts, the most expensive MSL phase). `train_step` would tie the order to the epoch (first
  order before `first_order_epochs`, which is after MSL ends in the paper presets), so the bench
  calls `update(batch, weights, second_order, lr)`, the step `train_step` runs, directly;
- the FLOPs of one such step (torch.utils.flop_counter, counted on the loop implementation: under
  vmap the convs are grouped and the counter over-counts a grouped conv's weight gradient by the
  number of groups), the FLOP/s achieved and that figure as a fraction of the same device's
  measured float32 matmul throughput;
- how long the step waited for data: batches come from the engine's `Prefetcher` over a
  synthetic in-memory uint8 dataset, exactly as in training;
- validation speed: `learner.evaluate` on fixed tasks (task assembly timed apart) and the FLOPs
  of one task;
- peak memory per phase: VmHWM (reset between phases through /proc/self/clear_refs) on CPU,
  torch.cuda.max_memory_allocated on CUDA.

    result = run_bench(BenchOptions(presets=["omniglot-5w1s"]))   # dict, JSON-ready

`python -m engine.bench JOB_JSON OUT_FILE` is the per-process worker (internal). This module
measures only: issue 6's acceptance targets are judged in benchmarks/acceptance.py, and the
measurements themselves are in benchmarks/README.md.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.config import ConfigError, resolve
from engine.data.cache import FewShotDataset
from engine.data.sampler import Prefetcher, TaskSampler
from engine.errors import UserError
from engine.evaluation import EVAL_BATCH
from engine.learner import MetaLearner, NonFiniteLossError
from engine.msl import msl_weights
from engine.presets import preset_names
from engine.schedule import meta_lr

SCHEMA = "mamlpp-bench/1"
PAPER_PRESETS = ("omniglot-5w1s", "omniglot-5w5s", "omniglot-20w1s", "omniglot-20w5s",
                 "miniimagenet-5w1s", "miniimagenet-5w5s")
GIB = 1 << 30

# Split sizes (classes) of the real datasets and images per class of the real caches; the
# synthetic stand-in keeps the class counts but only max(20, shots+queries) images per class
# (task assembly cost does not depend on it), and the JSON says how many bytes that saves.
SPLIT_CLASSES = {"omniglot": (1150, 50, 423), "miniimagenet": (64, 16, 20),
                 "quickstart": (2000, 400, 600)}
REAL_PER_CLASS = {"omniglot": 20, "miniimagenet": 600, "quickstart": 20}
IMAGENET_NORM = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


@dataclass
class BenchOptions:
    presets: list[str] = field(default_factory=lambda: ["quickstart"])
    impls: list[str] = field(default_factory=lambda: ["loop", "vmap"])
    orders: list[str] = field(default_factory=lambda: ["first", "second"])
    device: str = "auto"
    iters: int | None = None  # timed iterations per phase; None: 3 for mini-ImageNet, else 5
    warmup: int = 1
    eval_tasks: int = 50  # validation tasks timed per implementation (0: skip)
    eval_repeats: int = 1
    threads: int | None = None  # torch intra-op threads in the workers (None: torch's default)
    overrides: list[str] = field(default_factory=list)  # section.key=value, for every preset
    isolate: bool = True  # one fresh process per (preset, impl); False: in this process
    job_timeout: float | None = None
    memory_cap_bytes: int | None = None  # RLIMIT_DATA of each worker (Linux); None: no cap
    matmul_n: int | None = None  # size of the yardstick matmul (None: 2048 on CPU, 8192 on CUDA)
    paired_rounds: int = 3  # with auto and plain: rounds of both alternating in one process
    paired_only: bool = False  # skip the per-implementation phases


# ---- the machine --------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device,
        "cpu_model": _cpu_model(),
        "cpu_logical_cores": psutil.cpu_count(logical=True),
        "cpu_physical_cores": psutil.cpu_count(logical=False),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_bytes": psutil.virtual_memory().total,
        "ram_available_bytes": psutil.virtual_memory().available,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = {"name": p.name, "memory_bytes": p.total_memory,
                       "capability": f"{p.major}.{p.minor}", "cuda": torch.version.cuda,
                       "cudnn": torch.backends.cudnn.version(),
                       "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                       "allow_tf32_cudnn": torch.backends.cudnn.allow_tf32}
    return info


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_throughput(device_name: str, n: int | None = None, reps: int | None = None) -> dict:
    """Best float32 FLOP/s of an n x n matmul on the device: the yardstick for FLOP fractions."""
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 2048)
    reps = reps or (20 if cuda else 5)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    _sync(device)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return {"n": n, "dtype": "float32", "reps": reps, "flops_per_s": 2 * n**3 / best}


# ---- memory -------------------------------------------------------------------------------


def proc_status(key: str, pid: int | str = "self") -> int | None:
    """Bytes of a /proc/PID/status memory field (VmRSS, VmHWM, RssAnon, ...); None if absent."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss() -> int:
    rss = proc_status("VmRSS")
    if rss is not None:
        return rss
    return psutil.Process().memory_info().rss


class PeakMemory:
    """Peak resident memory (and CUDA allocation) of one phase of this process."""

    def __init__(self, device) -> None:
        self.device = device
        self.resettable = False
        self.start_rss = 0

    def reset(self) -> None:
        self.start_rss = current_rss()
        try:  # Linux >= 4.0: "5" resets the peak RSS (VmHWM) to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.resettable = proc_status("VmHWM") is not None
        except OSError:
            self.resettable = False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> dict[str, Any]:
        if self.resettable:
            peak, method = proc_status("VmHWM"), "VmHWM since phase start"
        else:  # whole-process peak so far (Linux reports KiB, macOS bytes)
            scale = 1 if sys.platform == "darwin" else 1024
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
            method = "ru_maxrss (process lifetime)"
        out: dict[str, Any] = {"peak_rss_bytes": peak, "rss_at_start_bytes": self.start_rss,
                               "rss_method": method, "cuda_peak_bytes": None}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
            out["cuda_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
        return out


# ---- synthetic data -----------------------------------------------------------------------


def synthetic_dataset(config, seed: int = 0):
    """An in-memory FewShotDataset with random uint8 images shaped like the config's dataset."""
    name = config.data.dataset
    c, h, w = config.image_shape
    d = config.data
    per_class = max(20, d.shots + d.queries)
    g = torch.Generator().manual_seed(seed)
    splits, names = {}, {}
    for split, n in zip(("train", "val", "test"), SPLIT_CLASSES[name]):
        n = max(n, d.ways)
        shape = (n, per_class, c, h, w)
        if name == "miniimagenet":
            x = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        else:  # binary glyphs, ink = 1
            x = (torch.rand(shape, generator=g) < 0.2).to(torch.uint8)
        splits[split], names[split] = x, [f"synthetic-{i}" for i in range(n)]
    manifest: dict[str, Any] = {"image_shape": [c, h, w]}
    if name == "miniimagenet":
        manifest.update(pixel_max=255, normalize={"mean": IMAGENET_NORM[0],
                                                  "std": IMAGENET_NORM[1]})
    else:
        manifest.update(pixel_max=1, train_augment="rot90")
    return FewShotDataset(name=f"synthetic-{name}", splits=splits, class_names=names,
                          manifest=manifest)


def dataset_bytes(config) -> dict[str, int]:
    """uint8 bytes of the real cached dataset vs the synthetic stand-in the bench holds."""
    c, h, w = config.image_shape
    name = config.data.dataset
    classes = sum(max(n, config.data.ways) for n in SPLIT_CLASSES[name])
    synthetic_per_class = max(20, config.data.shots + config.data.queries)
    return {"real": classes * REAL_PER_CLASS[name] * c * h * w,
            "synthetic": classes * synthetic_per_class * c * h * w}


# ---- one process: one preset, one implementation --------------------------------------------


def default_iters(preset_config) -> int:
    return 3 if preset_config.data.dataset == "miniimagenet" else 5


# What each bench "implementation" is, as config overrides: `auto` is the engine's default path
# for the device, `plain` the per-task loop without the speed paths (no task threads, no
# folded tasks, no channels-last, no compiled kernels, no NNPACK convolutions): the baseline the
# default must never be slower than.
IMPLS = {
    "auto": [],
    "plain": ["train.impl=loop", "train.task_threads=1", "train.task_group=1",
              "train.channels_last=never", "train.fused_kernels=off", "train.fft_conv=off"],
    "loop": ["train.impl=loop"],
    "vmap": ["train.impl=vmap"],
}


def parse_impls(value: str) -> list[str]:
    """`auto,plain` -> ["auto", "plain"]; `both` is loop and vmap, `all` every one."""
    named = {"both": ["loop", "vmap"], "all": list(IMPLS)}
    out = [i for part in value.split(",") for i in named.get(part.strip(), [part.strip()])]
    bad = [i for i in out if i not in IMPLS]
    if bad or not out:
        raise ConfigError(f"--impl takes {', '.join(IMPLS)}, both or all, comma-separated "
                          f"(got {value!r}).")
    return list(dict.fromkeys(out))


def _config(job: dict):
    return resolve(job["preset"], overrides=[*job.get("overrides", []), *IMPLS[job["impl"]]])


@contextlib.contextmanager
def _counted_path(learner):
    """The learner on a path torch's FLOP counter counts whole. The counter is a dispatch mode,
    which is per thread: count on the calling one, one task per pass (torch's counter takes a
    grouped convolution's weight gradient for a dense one, G times the FLOPs of the same
    arithmetic unfolded), convolutions as torch's (it has no formula for NNPACK's:
    engine/fft_conv.py's would not count; the roofline counts the direct algorithm's
    arithmetic)."""
    paths = learner.paths
    learner.paths = replace(paths, task_threads=1, task_threads_second_order=1, task_group=1,
                            fft_conv=False)
    try:
        yield
    finally:
        learner.paths = paths


def count_step_flops(learner, batch, weights: list[float], second_order: bool) -> int:
    """FLOPs of one meta-update (`learner.update`); performs the update."""
    counter = FlopCounterMode(display=False)
    with _counted_path(learner), counter:
        _update(learner, batch, weights, second_order)
    return int(counter.get_total_flops())


def _update(learner, batch, weights: list[float], second_order: bool) -> None:
    """One timed meta-update: the learner's own `update`, which training runs."""
    try:
        learner.update(batch, weights, second_order, meta_lr(0, learner.config))
    except NonFiniteLossError:
        pass


def _train_phase(job: dict, cfg, dataset, device, order: str, matmul: float) -> dict[str, Any]:
    second = order == "second"
    d, t = cfg.data, cfg.train
    warmup, iters = int(job["warmup"]), int(job["iters"])
    epoch = int(job.get("epoch", 0))  # 0: the MSL phase, every step's query loss counts
    weights = msl_weights(epoch, t.inner_steps, cfg.maml_pp.msl_epochs, cfg.maml_pp.msl)
    memory = PeakMemory(device)
    memory.reset()
    learner = MetaLearner(cfg, device)
    sampler = TaskSampler(dataset, "train", d.ways, d.shots, d.queries, t.seed)
    count_self = bool(job.get("count_flops", True))
    extra = 0 if (warmup or not count_self) else 1
    flops_self: int | None = None
    flops_error = None
    times, cpu_times, waits = [], [], []
    with Prefetcher(sampler, 0, t.meta_batch, warmup + iters + extra, device) as batches:
        for i in range(warmup + extra):
            batch = next(batches)
            if i == 0 and count_self:
                try:
                    flops_self = count_step_flops(learner, batch, weights, second)
                except Exception as e:  # the counter must never sink the timing
                    flops_error = f"{type(e).__name__}: {e}"
                    learner.optimizer.zero_grad(set_to_none=True)
            else:
                _update(learner, batch, weights, second)
        _sync(device)
        for _ in range(iters):
            w0, t0, c0 = batches.wait_seconds, time.perf_counter(), time.process_time()
            batch = next(batches)
            _update(learner, batch, weights, second)
            _sync(device)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
            waits.append(batches.wait_seconds - w0)
    out: dict[str, Any] = {
        "order": order, "second_order": second, "epoch": epoch, "msl_weights": weights,
        "path": _path(learner.paths, second),
        "warmup": warmup, "iters": iters, "seconds": times,
        "s_per_iter": statistics.median(times), "s_per_iter_min": min(times),
        "s_per_iter_mean": statistics.fmean(times),
        "cpu_s_per_iter": statistics.median(cpu_times),
        "data_wait_s": sum(waits), "data_wait_fraction": sum(waits) / sum(times),
        "flops_per_iter": None, "flops_counted_on": None,
        f"flops_counted_{job['impl']}": flops_self,
    }
    if flops_error:
        out["flops_error"] = flops_error
    if job["impl"] == "loop":
        out["flops_per_iter"], out["flops_counted_on"] = flops_self, "loop"
    elif job.get("loop_flops_here"):
        loop_learner = MetaLearner(_config({**job, "impl": "loop"}), device)
        out["flops_per_iter"] = count_step_flops(loop_learner, batch, weights, second)
        out["flops_counted_on"] = "loop"
        del loop_learner
    _add_flop_rates(out, matmul)
    out.update(memory.read())
    return out


def _add_flop_rates(phase: dict[str, Any], matmul: float | None) -> None:
    flops = phase.get("flops_per_iter")
    rate = flops / phase["s_per_iter"] if flops and phase["s_per_iter"] > 0 else None
    phase["flops_per_s"] = rate
    phase["matmul_fraction"] = rate / matmul if rate and matmul else None


def _out_of_memory(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, MemoryError) or "can't allocate memory" in text or "out of memory" in text


def _eval_phase(job: dict, cfg, dataset, device) -> dict[str, Any]:
    """Validation speed as the trainer runs it: EVAL_BATCH tasks assembled, then adapted
    `chunk_size` at a time (0: all at once). When the tasks do not fit in memory (the bench's
    cap, or the GPU), measure again with a fifth of them and say so."""
    n = int(job["eval_tasks"])
    failures = []
    while True:
        try:
            out = _eval_tasks(job, cfg, dataset, device, n)
        except (RuntimeError, MemoryError) as e:
            if not _out_of_memory(e) or n <= 1:
                raise
            failures.append({"tasks": n, "error": str(e).splitlines()[0][:300]})
            if device.type == "cuda":
                torch.cuda.empty_cache()
            n = max(1, n // 5)
            continue
        if failures:
            out["out_of_memory"] = failures
        return out


def _eval_tasks(job: dict, cfg, dataset, device, n: int) -> dict[str, Any]:
    impl = {"auto": None, "plain": "loop"}.get(job["impl"], job["impl"])  # None: evaluate's own
    chunk = cfg.train.chunk_size
    d = cfg.data
    sampler = TaskSampler(dataset, "val", d.ways, d.shots, d.queries, cfg.train.seed,
                          augment=False)
    memory = PeakMemory(device)
    memory.reset()
    learner = MetaLearner(cfg, device)
    learner.evaluate(sampler.batch(0, min(n, 2)).to(device), chunk=chunk, impl=impl)  # warm-up
    adapt, assemble = [], []
    for _ in range(max(1, int(job.get("eval_repeats", 1)))):
        a_total = s_total = 0.0
        for start in range(0, n, EVAL_BATCH):
            t0 = time.perf_counter()
            batch = sampler.batch(start, min(EVAL_BATCH, n - start)).to(device)
            _sync(device)
            t1 = time.perf_counter()
            learner.evaluate(batch, chunk=chunk, impl=impl)
            _sync(device)
            s_total += t1 - t0
            a_total += time.perf_counter() - t1
        adapt.append(a_total)
        assemble.append(s_total)
    a, s = statistics.median(adapt), statistics.median(assemble)
    out = {"impl": job["impl"], "evaluate_impl": impl or learner.impl, "tasks": n,
           "chunk_size": chunk, "batch": EVAL_BATCH,
           "inner_steps": cfg.train.eval_inner_steps, "repeats": len(adapt),
           "adapt_seconds": a, "assembly_seconds": s, "s_per_task": (a + s) / n,
           "adapt_s_per_task": a / n, "tasks_per_s": n / (a + s)}
    out.update(memory.read())
    out.update(eval_flop_rates(eval_flops_per_task(learner, sampler, device), a / n,
                               job.get("matmul_flops_per_s")))
    return out


def eval_flops_per_task(learner, sampler, device) -> int:
    """FLOPs of adapting to one validation task and predicting its queries (loop impl)."""
    counter = FlopCounterMode(display=False)
    with _counted_path(learner), counter:
        learner.evaluate(sampler.batch(0, 1).to(device), impl="loop")
    return int(counter.get_total_flops())


def eval_flop_rates(flops: int, adapt_s_per_task: float, matmul: float | None) -> dict:
    rate = flops / adapt_s_per_task if adapt_s_per_task > 0 else None
    return {"flops_per_task": flops, "flops_per_s": rate,
            "matmul_fraction": rate / matmul if rate and matmul else None}


def shape_of(cfg) -> dict[str, Any]:
    return {"dataset": cfg.data.dataset, "image_shape": list(cfg.image_shape),
            "ways": cfg.data.ways, "shots": cfg.data.shots, "queries": cfg.data.queries,
            "meta_batch": cfg.train.meta_batch, "filters": cfg.model.filters,
            "stages": cfg.model.stages, "inner_steps": cfg.train.inner_steps,
            "eval_inner_steps": cfg.train.eval_inner_steps, "chunk_size": cfg.train.chunk_size}


def _path(paths, second: bool) -> dict[str, Any]:
    """What a training step of this order runs: the resolved fast path."""
    return {"impl": paths.impl, "precision": paths.precision,
            "task_threads": paths.task_threads_second_order if second else paths.task_threads,
            "task_group": paths.task_group, "channels_last": list(paths.layout_for(second))}


def _paired_phase(job: dict, dataset, device, order: str) -> dict[str, Any]:
    """auto and plain on the same meta-batch, alternating in one process: machine speed drifts
    between minutes by more than some of the differences measured, and this cancels it."""
    second = order == "second"
    learners = {impl: MetaLearner(_config({**job, "impl": impl}), device)
                for impl in ("auto", "plain")}
    cfg = learners["auto"].config
    d, t = cfg.data, cfg.train
    weights = msl_weights(0, t.inner_steps, cfg.maml_pp.msl_epochs, cfg.maml_pp.msl)
    batch = TaskSampler(dataset, "train", d.ways, d.shots, d.queries, t.seed).batch(
        0, t.meta_batch).to(device)
    seconds: dict[str, list[float]] = {impl: [] for impl in learners}
    for learner in learners.values():  # warm-up
        learner.meta_loss(batch, weights, second)
    for _ in range(max(1, int(job.get("paired_rounds", 3)))):
        for impl, learner in learners.items():
            _sync(device)
            t0 = time.perf_counter()
            learner.meta_loss(batch, weights, second)
            _sync(device)
            seconds[impl].append(time.perf_counter() - t0)
    return {"order": order, "seconds": seconds,
            "s_per_iter": {k: statistics.median(v) for k, v in seconds.items()},
            "paths": {k: _path(learner.paths, second) for k, learner in learners.items()},
            "load_average": list(os.getloadavg())}


def measure(job: dict) -> dict[str, Any]:
    """One phase ("first" | "second" | "eval") of one (preset, impl) in this process: the
    worker's body. A fresh process per phase keeps the peak-memory figures apart."""
    with _job_settings(job):
        return _measure(job)


@contextlib.contextmanager
def _job_settings(job: dict):
    """Threads, TF32 flags (the learner sets them from train.precision) and the memory cap of
    a job, restored afterwards (in-process runs)."""
    saved = (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32, resource.getrlimit(resource.RLIMIT_DATA))
    try:
        if job.get("threads"):
            torch.set_num_threads(int(job["threads"]))
        if job.get("memory_cap_bytes") and job.get("device", "cpu") == "cpu":
            # soft limit: an allocation past it fails here only (not on CUDA: the driver maps
            # large address ranges)
            hard = saved[3][1]
            cap = int(job["memory_cap_bytes"])
            resource.setrlimit(resource.RLIMIT_DATA,
                               (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1:3]
        resource.setrlimit(resource.RLIMIT_DATA, saved[3])


def _measure(job: dict) -> dict[str, Any]:
    device = torch.device(job["device"])
    cfg = _config(job)
    job = {**job, "iters": job.get("iters") or default_iters(cfg)}
    dataset = synthetic_dataset(cfg)
    matmul = matmul_throughput(job["device"], job.get("matmul_n"))["flops_per_s"]
    setup = {"threads": torch.get_num_threads(), "matmul_flops_per_s": matmul,
             "rss_after_setup_bytes": current_rss(), "load_average": list(os.getloadavg()),
             "memory_cap_bytes": job.get("memory_cap_bytes")}
    if job["phase"].startswith("paired-"):
        out = _paired_phase(job, dataset, device, job["phase"].split("-", 1)[1])
    elif job["phase"] == "eval":
        out = _eval_phase({**job, "matmul_flops_per_s": matmul}, cfg, dataset, device)
    else:
        out = _train_phase(job, cfg, dataset, device, job["phase"], matmul)
    out.update(setup)
    # as the phase ran them: the learner sets these from train.precision
    out["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32,
                   "cudnn": torch.backends.cudnn.allow_tf32}
    out["process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


# ---- the driver ---------------------------------------------------------------------------


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available; "
                        "use --device cpu.")
    if requested != "cpu" and not requested.startswith("cuda"):
        raise UserError(f"--device must be auto, cpu or cuda (got {requested!r}).")
    return requested


def expand_presets(names: list[str]) -> list[str]:
    out: list[str] = []
    for name in names or ["quickstart"]:
        for n in (PAPER_PRESETS if name in ("paper", "all") else (name,)):
            if n not in out:
                out.append(n)
    known = preset_names()

    for n in out:
        if n not in known:
            raise ConfigError(f"Unknown preset {n!r}; available: {', '.join(known)} "
                              f"(or `paper` for the six paper presets).")
    return out


def _project_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def _run_isolated(job: dict, timeout: float | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mamlpp-bench-") as tmp:
        out_file = Path(tmp) / "result.json"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_project_root(),
                                                       env.get("PYTHONPATH")) if p)
        try:
            proc = subprocess.run([sys.executable, "-m", "engine.bench", json.dumps(job),
                                   str(out_file)], env=env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout} s"}
        if proc.returncode != 0 or not out_file.exists():
            tail = (proc.stderr or "").strip().splitlines()[-3:]
            why = "killed (out of memory?)" if proc.returncode in (-9, 137) else "failed"
            return {"error": f"worker {why}, exit {proc.returncode}: {' | '.join(tail)}"}
        return json.loads(out_file.read_text())


def run_bench(options: BenchOptions,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every (preset, impl) measurement; return the JSON-ready report."""

    say = progress or (lambda _msg: None)
    for impl in options.impls:
        if impl not in IMPLS:
            raise ConfigError(f"--impl must be among {', '.join(IMPLS)}, both (loop and vmap) "
                              f"or all (got {impl!r}).")
    for order in options.orders:
        if order not in ("first", "second"):
            raise ConfigError(f"--order must be first, second or both (got {order!r}).")
    if options.iters is not None and options.iters < 1:
        raise ConfigError(f"--iters must be at least 1 (got {options.iters}).")
    if options.warmup < 0 or options.eval_tasks < 0:
        raise ConfigError("--warmup and --eval-tasks must not be negative.")
    presets = expand_presets(options.presets)
    device = resolve_device(options.device)
    for preset in presets:  # config errors (bad --set) before any measurement

        resolve(preset, overrides=options.overrides)
    started = time.time()
    load_start = list(os.getloadavg())
    info = device_info(device)
    say(f"device {device}: {info['cpu_model']}"
        + (f", {info['gpu']['name']}" if info["gpu"] else "")
        + f"; load average {load_start[0]:.2f}")
    matmul = matmul_throughput(device, options.matmul_n)
    results = []
    paired: dict[str, dict[str, Any]] = {}
    phases = [*options.orders, *(["eval"] if options.eval_tasks > 0 else [])]
    for preset in presets:
        cfg = resolve(preset, overrides=options.overrides)
        for impl in [] if options.paired_only else options.impls:
            result: dict[str, Any] = {
                "preset": preset, "impl": impl, "device": device, "shape": shape_of(cfg),
                "dataset_bytes": dataset_bytes(cfg), "train": {}, "eval": None}
            t0 = time.perf_counter()
            for phase in phases:
                job = {"preset": preset, "impl": impl, "device": device, "phase": phase,
                       "iters": options.iters, "warmup": options.warmup,
                       "eval_tasks": options.eval_tasks, "eval_repeats": options.eval_repeats,
                       "threads": options.threads,
                       "overrides": options.overrides,
                       "memory_cap_bytes": options.memory_cap_bytes,
                       "matmul_n": options.matmul_n,
                       "count_flops": True, "loop_flops_here": "loop" not in options.impls}
                say(f"{preset} {impl} {phase}: measuring ...")
                if options.isolate:
                    measured = _run_isolated(job, options.job_timeout)
                else:
                    try:
                        measured = measure(job)
                    except Exception as e:  # same as a failed worker: record and go on
                        measured = {"error": f"{type(e).__name__}: {e}"}
                say(f"{preset} {impl} {phase}: {_phase_line(measured)}")
                if phase == "eval":
                    result["eval"] = measured
                else:
                    result["train"][phase] = measured
            result["wall_seconds"] = time.perf_counter() - t0
            results.append(result)
        if {"auto", "plain"} <= set(options.impls) and options.paired_rounds > 0:
            for order in options.orders:
                job = {"preset": preset, "impl": "auto", "device": device,
                       "phase": f"paired-{order}", "paired_rounds": options.paired_rounds,
                       "threads": options.threads,
                       "overrides": options.overrides,
                       "memory_cap_bytes": options.memory_cap_bytes, "matmul_n": 256}
                say(f"{preset} auto vs plain {order}, alternating: measuring ...")
                measured = _run_isolated(job, options.job_timeout) if options.isolate else \
                    measure(job)
                paired.setdefault(preset, {})[order] = measured
                if "error" not in measured:
                    m = measured["s_per_iter"]
                    say(f"{preset} auto vs plain {order}: {m['auto']:.3f} vs {m['plain']:.3f} s")
    _share_loop_flops(results)
    report = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "duration_s": time.time() - started,
        "device": info,
        "load_average_start": load_start,
        "load_average_end": list(os.getloadavg()),
        "options": asdict(options),
        "matmul": matmul,
        "results": results,
        "paired": paired,
    }
    report["rows"] = summary_rows(report)
    return report


def _phase_line(p: dict) -> str:
    if "error" in p:
        return p["error"]
    if "tasks_per_s" in p:
        return f"{p['tasks_per_s']:.2f} tasks/s, peak RSS {p['peak_rss_bytes'] / GIB:.2f} GiB"
    return f"{p['s_per_iter']:.3f} s/iter, peak RSS {p['peak_rss_bytes'] / GIB:.2f} GiB"


def _ok(phase: dict | None) -> bool:
    return bool(phase) and "error" not in phase


def _share_loop_flops(results: list[dict]) -> None:
    """Give the vmap results the loop implementation's FLOP count for the same preset/order."""
    loop = {(r["preset"], o): p.get("flops_per_iter") for r in results if r["impl"] == "loop"
            for o, p in r["train"].items() if _ok(p)}
    for r in results:
        if r["impl"] == "loop":
            continue
        for order, phase in r["train"].items():
            if _ok(phase) and phase.get("flops_per_iter") is None and loop.get((r["preset"],
                                                                                order)):
                phase["flops_per_iter"] = loop[(r["preset"], order)]
                phase["flops_counted_on"] = "loop"
                _add_flop_rates(phase, phase["matmul_flops_per_s"])


def training_rss_estimate(r: dict) -> int | None:
    """Peak RSS of a training process: the larger of the train and validation phases, plus the
    bytes of the real dataset the synthetic stand-in does not hold."""
    phases = [*r["train"].values(), r.get("eval")]
    peaks = [p["peak_rss_bytes"] for p in phases if _ok(p) and p.get("peak_rss_bytes")]
    if not peaks:
        return None
    extra = r["dataset_bytes"]["real"] - r["dataset_bytes"]["synthetic"]
    return max(peaks) + max(0, extra)


def _gib(value: int | None) -> float | None:
    return None if value is None else value / GIB


def summary_rows(report: dict) -> list[dict[str, Any]]:
    """One flat row per (preset, impl, order): the table of the README."""
    rows = []
    for r in report["results"]:
        ev = r.get("eval") if _ok(r.get("eval")) else {}
        for order, p in r["train"].items():
            row: dict[str, Any] = {"preset": r["preset"], "impl": r["impl"], "order": order}
            if not _ok(p):
                rows.append({**row, "error": p.get("error", "not measured")})
                continue
            row.update({
                "s_per_iter": p["s_per_iter"], "cpu_s_per_iter": p["cpu_s_per_iter"],
                "gflops_per_iter": p["flops_per_iter"] / 1e9 if p["flops_per_iter"] else None,
                "matmul_fraction": p["matmul_fraction"],
                "data_wait_fraction": p["data_wait_fraction"],
                "train_peak_rss_gib": _gib(p["peak_rss_bytes"]),
                "cuda_peak_gib": _gib(p.get("cuda_peak_bytes")),
                "eval_tasks": ev.get("tasks"),
                "eval_out_of_memory_at_tasks": [f["tasks"] for f in ev.get("out_of_memory", [])]
                or None,
                "eval_tasks_per_s": ev.get("tasks_per_s"),
                "eval_s_per_task": ev.get("s_per_task"),
                "eval_matmul_fraction": ev.get("matmul_fraction"),
                "eval_peak_rss_gib": _gib(ev.get("peak_rss_bytes")),
                "eval_cuda_peak_gib": _gib(ev.get("cuda_peak_bytes")),
                "training_rss_estimate_gib": _gib(training_rss_estimate(r)),
            })
            if r.get("eval") and not ev:
                row["eval_error"] = r["eval"].get("error")
            rows.append(row)
    return rows


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def _worker_main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m engine.bench JOB_JSON OUT_FILE (internal worker)",
              file=sys.stderr)
        return 2
    result = measure(json.loads(argv[0]))
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
