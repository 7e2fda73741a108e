"""engine/fused_cpu.py: batch norm fused with the 2x2 max-pool as compiled CPU kernels.

The kernels are float32 only, so they are checked against float64 computations by torch's own
batch norm and max-pool: the op's values, codes (the window each maximum came from) and
gradients, and a whole second-order meta-gradient of the learner against the float64 one,
within 3x of the engine's float32 path without the kernels. Also: results do not depend on
the task-thread count, and `auto` falls back to torch's ops where the kernels cannot be built.
Skipped where they cannot be built (no C compiler), with the reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import fused_cpu
from engine.errors import UserError
from engine.learner import MetaLearner
from tests.helpers import bn_second_derivatives, meta_grads, small_config

# built once by tests/conftest.py where a toolchain exists; skipped (with why) where none could be
needs_kernels = pytest.mark.skipif(fused_cpu.load() is None,
                                   reason=f"fused CPU kernels: {fused_cpu._state['error']}")
EPS = 1e-5


def _ground_truth(x64, w64, b64):
    """Float64 batch norm (training mode) and 2x2 max-pool by torch's ops, with the flat index
    of each window's maximum."""
    y = torch.nn.functional.batch_norm(x64, None, None, w64, b64, training=True, eps=EPS)
    out, indices = F.max_pool2d(y, 2, return_indices=True)
    return y, out, indices


@needs_kernels
@pytest.mark.parametrize("shape", [(5, 8, 28, 28), (3, 6, 7, 7), (4, 5, 21, 21), (2, 3, 9, 6),
                                   (2, 3, 8, 9), (3, 2, 5, 36)])
@pytest.mark.parametrize("ties", [False, True])
def test_kernels_equal_torch_in_float64(shape, ties):
    """Odd sizes (the last row and column outside every window), and images with many exactly
    tied values (as Omniglot's flat background gives), where the first maximum in scan order
    must win as in torch's kernels."""
    fused_cpu.load(required=True)
    gen = torch.Generator().manual_seed(sum(shape) + ties)
    x64 = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1
    if ties:
        x64 = x64.round()  # integers: exact ties, and no near-ties to round either way
    c = shape[1]
    w64 = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    w64[0] = -w64[0]  # a negative scale turns each window's minimum into its maximum
    b64 = torch.rand(c, generator=gen, dtype=torch.float64)
    x64.requires_grad_(True)
    w64.requires_grad_(True)
    b64.requires_grad_(True)
    _, out64, indices = _ground_truth(x64, w64, b64)
    g64 = torch.randn(out64.shape, generator=gen, dtype=torch.float64)
    gx64, gw64, gb64 = torch.autograd.grad(out64, (x64, w64, b64), g64)

    x, w, b = (t.detach().float() for t in (x64, w64, b64))
    out, mean, invstd, codes = fused_cpu.forward(x, w, b, EPS)
    h, wd = shape[-2:]
    starts = (torch.arange(h // 2) * 2 * wd)[:, None] + torch.arange(wd // 2)[None, :] * 2
    assert torch.equal(starts + codes.long(), indices)
    assert torch.allclose(out.double(), out64, rtol=1e-5, atol=1e-5)
    assert torch.allclose(mean.double(), x64.detach().mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    var = x64.detach().var((0, 2, 3), unbiased=False)
    assert torch.allclose(invstd.double(), (var + EPS).rsqrt(), rtol=1e-5)
    gx, gw, gb = fused_cpu.backward(g64.float(), x, w, mean, invstd, codes)
    for got, want in ((gx, gx64), (gw, gw64), (gb, gb64)):
        scale = want.abs().max().item()
        assert (got.double() - want).abs().max().item() <= 1e-5 * scale


@needs_kernels
@pytest.mark.parametrize("shape", [(5, 8, 28, 28), (3, 6, 7, 7), (2, 3, 9, 6), (3, 2, 5, 36)])
@pytest.mark.parametrize("outer", ["x", "all"])
def test_compiled_second_derivative_equals_torch_in_float64(shape, outer, monkeypatch):
    """The derivative of the fused backward (the batch-norm part of second-order MAML's
    meta-gradient) is compiled too: against torch's batch norm and max-pool differentiated twice
    in float64, it must be as close as the same closed form in torch's float32 ops (within 2x),
    and within 1e-5 of the largest value. Odd sizes leave rows and columns outside every window;
    b's derivative comes only through the gradient of the pooled output (d_g)."""
    from engine import batch_norm
    from engine.batch_norm import batch_norm_pool

    gen = torch.Generator().manual_seed(sum(shape))
    x64 = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1).requires_grad_()
    w64 = torch.rand(shape[1], generator=gen, dtype=torch.float64) + 0.5
    w64[0] = -w64[0]
    w64.requires_grad_()
    b64 = torch.rand(shape[1], generator=gen, dtype=torch.float64, requires_grad=True)
    pooled = (*shape[:2], shape[2] // 2, shape[3] // 2)
    r64 = torch.randn(pooled, generator=gen, dtype=torch.float64)
    want = bn_second_derivatives(lambda *a: _ground_truth(*a)[1], x64, w64, b64, r64,
                                 outer == "all")[2]

    calls = []
    real = fused_cpu.backward2
    monkeypatch.setattr(fused_cpu, "backward2", lambda *a: calls.append(1) or real(*a))

    def float32(compiled_second):
        monkeypatch.setattr(batch_norm, "COMPILED_SECOND_DERIVATIVE", compiled_second)
        x, w, b = (t.detach().float().requires_grad_() for t in (x64, w64, b64))
        return bn_second_derivatives(lambda *a: batch_norm_pool(*a, EPS, compiled=True)[0],
                                     x, w, b, r64.float(), outer == "all")[2]

    compiled, torch_ops = float32(True), float32(False)
    assert len(calls) == 1
    for got, ops, exact in zip(compiled, torch_ops, want):
        scale = exact.abs().max().item()
        error, ops_error = ((t.double() - exact).abs().max().item() / scale for t in (got, ops))
        assert error <= max(2 * ops_error, 1e-7) and error <= 1e-5, (error, ops_error)


def _worst(got: dict, want: dict) -> float:
    # conv biases feed batch norm: their meta-gradients are rounding noise on every path
    keys = [k for k in want if not (k.endswith("bias") and ".conv" in k)]
    return max(((got[k].double() - want[k]).norm() / want[k].norm()).item() for k in keys)


@needs_kernels
def test_second_order_meta_gradient_with_the_kernels_is_as_precise_as_without():
    """A second-order step (NCHW, one task per pass) with and without the kernels, each in
    float32 against the same step in float64: the kernels' meta-gradient is as close (within 3x:
    float32 summed in another order wanders by that much)."""
    base = ["train.task_threads=1", "train.task_group=1", "train.channels_last=never",
            "model.filters=8"]
    _, want = meta_grads(small_config(*base, "train.fused_kernels=off"), torch.float64)
    on, got_on = meta_grads(small_config(*base, "train.fused_kernels=on"), torch.float32)
    off, got_off = meta_grads(small_config(*base, "train.fused_kernels=off"), torch.float32)
    assert on.paths.fused_kernels and not off.paths.fused_kernels
    error_on, error_off = _worst(got_on, want), _worst(got_off, want)
    assert error_on <= max(3 * error_off, 1e-5), (error_on, error_off)
    assert _worst(got_on, {k: v.double() for k, v in got_off.items()}) > 0  # the kernels ran


@needs_kernels
def test_results_do_not_depend_on_task_threads_with_the_kernels():
    # at one intra-op thread, as tests/test_fast_paths.py: torch's own reductions split over
    # intra-op threads round differently
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = []
        for task_threads in (1, 2):
            config = small_config("train.task_group=1", "train.channels_last=never",
                                  "train.fused_kernels=on", "model.filters=8",
                                  f"train.task_threads={task_threads}")
            learner, got = meta_grads(config, torch.float32)
            assert learner.paths.fused_kernels
            results.append(got)
    finally:
        torch.set_num_threads(threads)
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k


@needs_kernels
def test_a_call_split_over_intra_op_threads_gives_the_same_bits(monkeypatch):
    """Large calls split their channels across the calling thread's intra-op threads: every
    channel must be computed, once, exactly as by one call (channels are independent)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 7, 12, 10, generator=gen)
    w, b = torch.rand(7, generator=gen) + 0.5, torch.randn(7, generator=gen)
    g = torch.randn(3, 7, 6, 5, generator=gen)

    ggx, ggw, ggb = torch.randn(x.shape, generator=gen), torch.randn(7, generator=gen), None

    def all_three():
        out, mean, invstd, codes = fused_cpu.forward(x, w, b, EPS)
        gx, gw, gb = fused_cpu.backward(g, x, w, mean, invstd, codes)
        second = fused_cpu.backward2(g, x, w, mean, invstd, codes, gw, gb, ggx, ggw, ggb)
        return (out, mean, invstd, codes, gx, gw, gb, *second)

    monkeypatch.setattr(fused_cpu, "PARALLEL_MIN_ELEMENTS", 1 << 60)
    whole = all_three()
    submitted = []
    pool = fused_cpu.helper_pool()
    monkeypatch.setattr(fused_cpu, "helper_pool", lambda: pool)
    monkeypatch.setattr(pool, "submit", lambda fn, *a: submitted.append(a) or
                        type(pool).submit(pool, fn, *a))
    monkeypatch.setattr(fused_cpu, "PARALLEL_MIN_ELEMENTS", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        split = all_three()
    finally:
        torch.set_num_threads(threads)
    # forward, backward and its derivative: channels 0-1 on the caller
    assert submitted == [(2, 4), (4, 7)] * 3
    for one, parts in zip(whole, split):
        assert torch.equal(one, parts)


def test_a_forked_process_gets_helper_threads_of_its_own(monkeypatch):
    """A fork copies the pool objects but none of their threads: work queued there would wait
    for ever, so the kernels' helpers and the task threads' pools are per process id."""
    import os

    from engine.task_threads import helper_pool, task_threads

    def task_pool():
        with task_threads(2, 2) as pool:
            return pool

    parent, parent_tasks = helper_pool(), task_pool()
    assert helper_pool() is parent and task_pool() is parent_tasks
    monkeypatch.setattr(os, "getpid", lambda: -1)
    child, child_tasks = helper_pool(), task_pool()
    assert child is not parent and child_tasks is not parent_tasks
    assert child is not child_tasks  # a task thread may wait on helpers
    assert child.submit(lambda: 7).result(timeout=60) == 7
    assert list(child_tasks.map(lambda v: v + 1, [1, 2])) == [2, 3]


def test_auto_falls_back_to_torch_ops_without_a_toolchain(monkeypatch):
    import engine.fast_paths as fast_paths

    monkeypatch.setattr(fast_paths, "toolchain", lambda: "no C compiler (cc) on PATH")
    learner = MetaLearner(small_config("train.fused_kernels=auto"))
    assert not learner.paths.fused_kernels


def test_on_without_kernels_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(fused_cpu, "_state", {"lib": None, "error": "no C compiler (cc) on PATH"})
    with pytest.raises(UserError, match="train.fused_kernels = on.*no C compiler"):
        MetaLearner(small_config("train.fused_kernels=on"))


def test_a_failed_build_leaves_torch_ops(monkeypatch, tmp_path):
    """auto: a compiler error is logged and the run goes on with torch's ops."""
    import subprocess

    def broken(args, **kwargs):
        raise subprocess.CalledProcessError(1, args, stderr="fused_bn_pool.c: error: oops")

    monkeypatch.setattr(fused_cpu, "_state", {"lib": None, "error": None})
    monkeypatch.setattr(fused_cpu, "toolchain", lambda: None)
    monkeypatch.setattr(fused_cpu, "_library_path", lambda: tmp_path / "k" / "lib.so")
    monkeypatch.setattr(subprocess, "run", broken)
    assert fused_cpu.load() is None
    assert "error: oops" in fused_cpu._state["error"]
    assert not list((tmp_path / "k").iterdir())  # no half-written library left
