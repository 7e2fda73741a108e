"""The speed paths change how the numbers are computed, never what they are."""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch

from engine.config import resolve
from engine.fast_paths import (
    FOLD_MAX_ELEMENTS,
    SECOND_ORDER_BUDGET,
    fast_paths,
    first_stage_elements,
    second_order_task_bytes,
)
from engine.grouped import fold_images
from engine.learner import MetaLearner
from engine.msl import msl_weights
from engine.tasks import TaskBatch, has_nhwc_strides
from tests.helpers import flat, grads, random_batch, small_config


def _step(cfg, dtype=torch.float32, second=True, seed=3):
    learner = MetaLearner(cfg, dtype=dtype)
    w = msl_weights(1, cfg.train.inner_steps, cfg.maml_pp.msl_epochs)
    result, loss = learner.meta_loss(random_batch(cfg, seed=seed), w, second)
    evaluated = learner.evaluate(random_batch(cfg, seed=seed + 1, tasks=5), impl="loop")
    return learner, result, loss, evaluated


@contextmanager
def _torch_threads(n: int):
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_intra_op_thread():
    # reductions split over intra-op threads round differently, so compare at one op thread
    with _torch_threads(1):
        yield


@pytest.mark.parametrize("second", [False, True])
def test_task_threads_give_bit_identical_results(second, one_intra_op_thread):
    # each task's gradient is taken on its own and added in task order, whichever thread ran it
    out = {}
    for threads in (1, 2, 3):
        cfg = small_config("train.meta_batch=5", "train.impl=loop",
                           f"train.task_threads={threads}")
        out[threads] = _step(cfg, second=second)
    one, *others = out.values()
    for learner, result, loss, evaluated in others:
        assert loss == one[2]
        assert torch.equal(result.losses, one[1].losses)
        assert torch.equal(flat(grads(learner)), flat(grads(one[0])))
        for k, v in learner.meta.running.items():
            assert torch.equal(v, one[0].meta.running[k]), k
        assert torch.equal(evaluated.logits, one[3].logits)


def test_vmapped_chunks_on_threads_match_one_chunk():
    ref = _step(small_config("train.meta_batch=4", "train.impl=vmap", "train.task_threads=1"),
                torch.float64)
    got = _step(small_config("train.meta_batch=4", "train.impl=vmap", "train.task_threads=2"),
                torch.float64)
    torch.testing.assert_close(flat(grads(got[0])), flat(grads(ref[0])), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1].logits, ref[1].logits, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", ["loop", "vmap"])
@pytest.mark.parametrize("layout", ["first_order", "always"])
def test_channels_last_changes_layout_not_numbers(impl, layout):
    a, ra, la, ea = _step(small_config(f"train.impl={impl}", "train.channels_last=never"),
                          torch.float64)
    b, rb, lb, eb = _step(small_config(f"train.impl={impl}", f"train.channels_last={layout}"),
                          torch.float64)
    assert la == pytest.approx(lb, rel=1e-12)
    torch.testing.assert_close(flat(grads(b)), flat(grads(a)), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(eb.logits, ea.logits, rtol=1e-9, atol=1e-12)


def test_channels_last_batch_has_nhwc_strides():
    batch = random_batch(small_config(), seed=1)
    query_only = batch.channels_last(support=False)
    assert query_only.x_support is batch.x_support
    assert query_only.x_query[0].is_contiguous(memory_format=torch.channels_last)
    both = batch.channels_last()
    assert torch.equal(both.x_support, batch.x_support)
    assert torch.equal(both.x_query, batch.x_query)
    for x in (both.x_support[0], both.x_query[0]):
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert x.stride(1) == 1  # real NHWC strides even with one channel


@pytest.mark.parametrize("second", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_autocast_runs_on_cpu_close_to_float32(second, threads):
    # autocast is per thread: tasks on worker threads must run under the caller's autocast
    _, r32, l32, e32 = _step(small_config("train.precision=float32",
                                          f"train.task_threads={threads}"), second=second)
    learner, r16, l16, e16 = _step(small_config("train.precision=bf16",
                                                f"train.task_threads={threads}"), second=second)
    assert learner.paths.precision == "bf16"
    assert l16 == pytest.approx(l32, rel=0.1)
    assert abs(l16 - l32) > 1e-4 * abs(l32)  # bf16 really ran
    assert (e16.logits.float() - e32.logits).abs().max() > 1e-4 * e32.logits.abs().max()
    assert torch.isfinite(flat(grads(learner))).all()
    assert (e16.logits.float() - e32.logits).abs().max() < 0.1 * e32.logits.abs().max()


@pytest.fixture
def four_torch_threads():
    with _torch_threads(4):
        yield


def test_auto_resolves_per_device(four_torch_threads):
    cfg = small_config()
    cpu = fast_paths(cfg, torch.device("cpu"))
    assert (cpu.impl, cpu.task_threads, cpu.precision) == ("loop", torch.get_num_threads(),
                                                           "float32")
    assert cpu.channels_last == "first_order"
    # small images: second-order steps put only the query channels-last
    assert cpu.layout_for(second_order=True) == (False, True)
    assert cpu.layout_for(second_order=False) == (True, True)
    cuda = fast_paths(cfg, torch.device("cuda"))
    assert (cuda.impl, cuda.task_threads, cuda.precision) == ("vmap", 1, "tf32")
    assert cuda.layout_for(second_order=False) == (False, False)
    assert cpu.task_threads_second_order == cpu.task_threads  # tiny graphs: a thread per core
    mini = resolve("miniimagenet-5w5s")
    big = fast_paths(mini, torch.device("cpu"))
    assert second_order_task_bytes(mini) * 2 > SECOND_ORDER_BUDGET  # two would not fit
    assert big.task_threads_second_order == 1 and big.task_threads == torch.get_num_threads()
    assert big.layout_for(second_order=True) == (False, False)  # 84 px: all NCHW
    assert big.shared_arena and not cpu.shared_arena and not cuda.shared_arena
    big_omniglot = fast_paths(resolve("omniglot-20w5s"), torch.device("cpu"))
    assert big_omniglot.task_threads_second_order == 1  # 1.2 GB estimated per task: one fits
    assert big_omniglot.layout_for(second_order=True) == (False, False)  # one task: all NCHW
    assert fast_paths(resolve("omniglot-20w1s"), torch.device("cpu")).task_threads_second_order == 4
    mini.train.task_threads = 2  # an explicit count is used for both
    assert fast_paths(mini, torch.device("cpu")).task_threads_second_order == 2
    cfg.train.task_threads, cfg.train.channels_last, cfg.train.impl = 3, "always", "vmap"
    cpu = fast_paths(cfg, torch.device("cpu"))
    assert (cpu.impl, cpu.task_threads, cpu.layout_for(True)) == ("vmap", 3, (True, True))


def test_auto_lays_large_tasks_out_nchw_only_with_both_kernels(monkeypatch):
    """Tasks larger than FOLD_MAX_ELEMENTS run first-order steps and evaluation NCHW, where
    the compiled kernels and NNPACK take them; without either (or for small, folded tasks, or
    an explicit layout) those passes stay channels-last."""
    import engine.fast_paths as module

    monkeypatch.setattr(module, "toolchain", lambda: None)
    cpu = torch.device("cpu")
    for name in ("omniglot-5w5s", "omniglot-20w1s", "omniglot-20w5s", "miniimagenet-5w1s"):
        cfg = resolve(name)
        assert first_stage_elements(cfg) > FOLD_MAX_ELEMENTS
        paths = fast_paths(cfg, cpu)
        assert paths.fused_kernels and paths.fft_conv and paths.channels_last == "never", name
        assert paths.layout_for(second_order=False) == (False, False), name
        for missing in ({"kernels_built": False}, {"nnpack": False}):
            without = fast_paths(cfg, cpu, **missing)
            assert without.layout_for(second_order=False) == (True, True), (name, missing)
    second = fast_paths(resolve("omniglot-20w1s"), cpu)  # several task threads, small images
    assert second.layout_for(second_order=True) == (False, second.task_threads_second_order > 1)
    assert fast_paths(resolve("omniglot-5w1s"), cpu).layout_for(second_order=False) == (True, True)
    explicit = resolve("miniimagenet-5w1s", overrides=["train.channels_last=first_order"])
    assert fast_paths(explicit, cpu).layout_for(second_order=False) == (True, True)
    off = resolve("miniimagenet-5w1s", overrides=["train.fft_conv=off"])
    assert fast_paths(off, cpu).layout_for(second_order=False) == (True, True)
    monkeypatch.setattr(module, "toolchain", lambda: "no C compiler (cc) on PATH")
    assert fast_paths(resolve("miniimagenet-5w1s"), cpu).channels_last == "first_order"
    assert fast_paths(resolve("miniimagenet-5w1s"), torch.device("cuda")).channels_last == "never"


def test_learner_lays_passes_out_for_the_kernels_it_got(monkeypatch):
    """A failed build (auto) or a torch without NNPACK: the learner resolves the layout again,
    so first-order passes do not run NCHW through torch's slow NCHW max-pool."""
    import engine.fast_paths as module
    from engine import fft_conv, fused_cpu

    monkeypatch.setattr(module, "toolchain", lambda: None)
    cfg = small_config("train.task_group=1", "data.ways=5", "data.shots=5", "model.filters=64")
    assert first_stage_elements(cfg) > FOLD_MAX_ELEMENTS
    monkeypatch.setattr(fused_cpu, "load", lambda required=False: object())
    monkeypatch.setattr(fft_conv, "supported", lambda: True)
    assert MetaLearner(cfg).paths.layout_for(second_order=False) == (False, False)
    monkeypatch.setattr(fft_conv, "supported", lambda: False)
    learner = MetaLearner(cfg)
    assert not learner.paths.fft_conv and learner.paths.fused_kernels
    assert learner.paths.layout_for(second_order=False) == (True, True)
    monkeypatch.setattr(fft_conv, "supported", lambda: True)
    monkeypatch.setattr(fused_cpu, "load", lambda required=False: None)
    learner = MetaLearner(cfg)
    assert not learner.paths.fused_kernels and learner.paths.fft_conv
    assert learner.paths.layout_for(second_order=False) == (True, True)


def test_auto_task_group_folds_small_tasks_on_cpu_only(four_torch_threads):
    """Auto folds one auto thread's share of the meta-batch where a task's first-stage
    activations are at most FOLD_MAX_ELEMENTS, whatever train.task_threads says."""
    small = resolve("omniglot-5w1s")  # 5 x 64 x 28 x 28 first-stage elements
    assert first_stage_elements(small) == 5 * 64 * 28 * 28 <= FOLD_MAX_ELEMENTS
    assert fast_paths(small, torch.device("cpu")).task_group == 2  # 8 tasks over 4 threads
    small.train.task_threads = 1  # explicit threads do not change what is computed
    assert fast_paths(small, torch.device("cpu")).task_group == 2
    assert fast_paths(small, torch.device("cuda")).task_group == 1
    small.train.impl = "reference"
    assert fast_paths(small, torch.device("cpu")).task_group == 1
    small.train.impl, small.train.task_group = "loop", 3  # explicit
    assert fast_paths(small, torch.device("cpu")).task_group == 3
    for name in ("omniglot-5w5s", "omniglot-20w1s", "omniglot-20w5s", "miniimagenet-5w1s"):
        cfg = resolve(name)
        assert first_stage_elements(cfg) > FOLD_MAX_ELEMENTS, name
        assert fast_paths(cfg, torch.device("cpu")).task_group == 1, name
    with _torch_threads(1):  # one core: the whole meta-batch in one pass
        assert fast_paths(resolve("omniglot-5w1s"), torch.device("cpu")).task_group == 8


_FAULTS = """
import resource, sys, torch
from engine.allocator import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(100):  # 64 MB and ~32 MB blocks, freed at once
    x = torch.empty(2**24).fill_(1)
    y = torch.empty(2**23 + i * 1000).fill_(2)
    del x, y
rss = int(open("/proc/self/statm").read().split()[1]) * 4096
assert rss < 2**30, rss  # a cache, not a leak
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_retained_memory_is_reused_without_page_faults():
    faults = {mode: int(subprocess.run([sys.executable, "-c", _FAULTS, mode], check=True,
                                       capture_output=True, text=True).stdout.split()[-1])
              for mode in ("default", "retain")}
    assert faults["retain"] < faults["default"] / 3



_ARENAS = """
import ctypes, os, sys, tempfile, threading, torch
from engine.allocator import retain_freed_memory
assert retain_freed_memory(shared_arena=sys.argv[1] == "shared")
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
def arenas():  # glibc's own report: one <heap> element per arena
    path = os.path.join(tempfile.mkdtemp(), "info.xml")
    f = ctypes.c_void_p(libc.fopen(path.encode(), b"w"))
    libc.malloc_info(0, f)
    libc.fclose(f)
    return open(path).read().count("<heap nr=")
torch.empty(10).fill_(1)
before = arenas()
thread = threading.Thread(target=lambda: torch.empty(10 * 2**20).fill_(1))
thread.start()
thread.join()
print(arenas() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_shared_arena_keeps_task_threads_in_the_main_heap():
    """With the shared arena a new thread allocates from the main heap (so it reuses what
    training freed); without, glibc gives it an arena of its own, which keeps its own peak."""
    new = {mode: int(subprocess.run([sys.executable, "-c", _ARENAS, mode], check=True,
                                    capture_output=True, text=True).stdout.split()[-1])
           for mode in ("separate", "shared")}
    assert new["shared"] == 0 < new["separate"], new


@pytest.mark.parametrize("channels", [1, 3])
def test_folded_images_keep_the_tasks_layout(channels):
    """engine/grouped.py: a channels-last batch folds into channels-last images (torch's
    channels-last kernels run only on those), NCHW into NCHW, and both hold task g's channel c
    at g * C + c."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, channels, 7, 7, generator=gen)
    y = torch.zeros(3, 5, dtype=torch.long)
    batch = TaskBatch(x, y, x, y)
    for layout, nhwc in ((batch, False), (batch.channels_last(), True)):
        folded = fold_images(layout.x_support)
        assert folded.is_contiguous(
            memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        assert has_nhwc_strides(folded) == nhwc
        for t in range(3):
            for k in range(channels):
                assert torch.equal(folded[:, t * channels + k], x[t][:, k])
