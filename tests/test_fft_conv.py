"""NNPACK's Fourier-domain convolutions (engine/fft_conv.py): the same function as torch's
convolution, to float32 rounding, through every derivative the second-order step takes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import fft_conv
from engine.errors import UserError
from engine.learner import MetaLearner
from tests.helpers import flat, meta_grads, random_batch, small_config

needs_nnpack = pytest.mark.skipif(not fft_conv.supported(), reason="no NNPACK in this torch")


@pytest.fixture
def one_intra_op_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def nnpack_calls(monkeypatch):
    """How many NNPACK convolutions ran; at any channel count (MIN_CHANNELS is a speed rule,
    and small shapes keep these tests fast)."""
    monkeypatch.setattr(fft_conv, "MIN_CHANNELS", 1)
    calls = []
    real = fft_conv._nnpack

    def counted(x, kernel, bias, padding=1):
        calls.append(tuple(x.shape))
        return real(x, kernel, bias, padding)

    monkeypatch.setattr(fft_conv, "_nnpack", counted)
    return calls


def _outputs_and_derivatives(conv, x, w, b):
    """y, its first derivatives (x, w, b) of a loss of y, and the derivatives of a loss of
    those first derivatives: every kind of term a second-order MAML step takes."""
    y = conv(x, w, b)
    loss = (y * y.detach().sin()).sum() + y.square().sum() * 0.1
    gx, gw, gb = torch.autograd.grad(loss, (x, w, b), create_graph=True)
    outer = (gx * gx).sum() + (gw * gw.detach().cos()).sum() + gb.square().sum()
    return (y, gx, gw, gb, *torch.autograd.grad(outer, (x, w, b)))


@needs_nnpack
@pytest.mark.parametrize("shape", [(3, 5, 6, 14), (2, 4, 3, 13), (2, 3, 5, 28), (2, 2, 4, 42)])
def test_every_derivative_matches_float64_convolution(shape, one_intra_op_thread, nnpack_calls):
    n, c, k, size = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(n, c, size, size + (size == 13), generator=g)  # one non-square size
    w = torch.randn(k, c, 3, 3, generator=g) * 0.3
    b = torch.randn(k, generator=g)
    assert fft_conv.applies(x, w, 1)

    def leaves(dtype):
        return [t.to(dtype).requires_grad_() for t in (x, w, b)]

    exact = _outputs_and_derivatives(lambda *a: F.conv2d(*a, padding=1), *leaves(torch.float64))
    onednn = _outputs_and_derivatives(lambda *a: F.conv2d(*a, padding=1), *leaves(torch.float32))
    got = _outputs_and_derivatives(fft_conv.conv3x3, *leaves(torch.float32))
    assert len(nnpack_calls) >= 6  # forward, input gradient and the derivatives of both
    # a Fourier transform spreads each tile's rounding over the whole tile: within 1e-5 of the
    # largest value, where oneDNN's direct sums measured 1e-7 to 2e-6
    errors = {}
    for name, fft, direct, want in zip(("y", "gx", "gw", "gb", "ggx", "ggw", "ggb"),
                                       got, onednn, exact):
        scale = want.abs().max().item()
        errors[name] = [(t.double() - want).abs().max().item() / scale for t in (fft, direct)]
    assert max(fft for fft, _ in errors.values()) <= 1e-5, errors


@needs_nnpack
@pytest.mark.parametrize("size", [(14, 14), (28, 29), (42, 17)])
def test_weight_gradient_in_fourier_blocks(size, one_intra_op_thread, nnpack_calls):
    """Up to 14x14 one Fourier tile takes the whole output gradient; wider ones are cut into
    14x14 blocks that join the images on the summed axis."""
    g = torch.Generator().manual_seed(size[1])
    x = torch.randn(3, 4, *size, generator=g, requires_grad=True)
    w = torch.randn(5, 4, 3, 3, generator=g, requires_grad=True)
    fft_conv.conv3x3(x, w).square().sum().backward()
    blocks = -(-size[0] // 14) * -(-size[1] // 14)
    # forward, input gradient, then the weight gradient: channels x (images x blocks) tiles
    side = 14 if blocks == 1 else 16
    assert nnpack_calls[2] == (4, 3 * blocks, *((side, side) if blocks > 1 else size))
    want = torch.autograd.grad(F.conv2d(x.double(), w.double(), padding=1).square().sum(),
                               w)[0]
    torch.testing.assert_close(w.grad, want.float(), rtol=1e-5, atol=1e-5 * want.abs().max())


def test_fourier_sizes_follow_nnpacks_rule():
    # by hand from NNPACK's rule: 8x8 Winograd tiles (6 outputs a side) against 16x16 Fourier
    # tiles (14 a side); Fourier when more than four times as many 8x8 tiles
    # 14: 3x3 = 9 vs 1 -> Fourier; 7: 2x2 = 4 vs 1 -> Winograd; 21: 4x4 = 16 vs 2x2 = 4 -> Winograd
    # 28: 5x5 = 25 vs 2x2 = 4 -> Fourier; 42: 7x7 = 49 vs 9; 84: 14x14 = 196 vs 36; 10: 4 vs 1
    fourier = {3: False, 5: False, 7: False, 10: False, 12: False, 13: True, 14: True,
               15: False, 16: False, 21: False, 28: True, 42: True, 84: True}
    for size, want in fourier.items():
        assert fft_conv.fourier(size, size) == want, size


@needs_nnpack
def test_applies_only_where_it_is_safe_and_faster():
    w = torch.zeros(16, 16, 3, 3)
    x = torch.zeros(2, 16, 14, 14)
    assert fft_conv.applies(x, w, 1)
    assert not fft_conv.applies(torch.zeros(2, 3, 14, 14), torch.zeros(16, 3, 3, 3), 1)
    assert not fft_conv.applies(torch.zeros(2, 4, 7, 7), w, 1)  # Winograd size
    assert not fft_conv.applies(x.double(), w.double(), 1)
    assert not fft_conv.applies(x.to(memory_format=torch.channels_last), w, 1)
    assert not fft_conv.applies(torch.zeros(2, 32, 14, 14), torch.zeros(32, 16, 3, 3), 2)


@needs_nnpack
def test_a_call_split_across_threads_gives_the_same_bits(monkeypatch):
    """Several intra-op threads split a call's images (and a weight gradient's channels)
    between the caller and a helper thread; NNPACK computes each image alone."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 6, 14, 14, generator=g, requires_grad=True)
    w = torch.randn(7, 6, 3, 3, generator=g, requires_grad=True)
    threads = torch.get_num_threads()
    results, helpers = [], []
    real = fft_conv.helper_pool
    monkeypatch.setattr(fft_conv, "SPLIT_MIN_ELEMENTS", 1)
    monkeypatch.setattr(fft_conv, "helper_pool", lambda: helpers.append(1) or real())
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            y = fft_conv.conv3x3(x, w)
            results.append((y, *torch.autograd.grad(y.square().sum(), (x, w))))
    finally:
        torch.set_num_threads(threads)
    assert len(helpers) == 2 * 3  # the split runs: forward, input and weight gradients
    for split in results[1:]:
        for got, want in zip(split, results[0]):
            assert torch.equal(got, want)


@needs_nnpack
def test_second_order_step_with_fourier_convolutions_is_as_precise_as_without(
        one_intra_op_thread, nnpack_calls):
    """A second-order step whose second stage (14x14) runs on NNPACK, in float32, against the
    same step in float64: as close as torch's own float32 convolutions are."""
    base = ["train.task_threads=1", "train.task_group=1", "train.channels_last=never",
            "model.filters=8"]
    _, want = meta_grads(small_config(*base, "train.fft_conv=off"), torch.float64)
    assert not nnpack_calls
    on, got_on = meta_grads(small_config(*base, "train.fft_conv=on"), torch.float32)
    assert on.paths.fft_conv and nnpack_calls
    off, got_off = meta_grads(small_config(*base, "train.fft_conv=off"), torch.float32)
    want, got_on, got_off = (flat(d).double() for d in (want, got_on, got_off))
    error_on, error_off = ((g - want).norm() / want.norm() for g in (got_on, got_off))
    assert error_on <= max(3 * error_off, 1e-5), (error_on, error_off)


@needs_nnpack
def test_evaluation_through_the_fast_nchw_passes_is_as_precise_as_channels_last(
        one_intra_op_thread, nnpack_calls):
    """Evaluation (first order, no graph) with NCHW passes through NNPACK and, where they build,
    the compiled kernels, against the same evaluation in float64: as close as the channels-last
    passes of torch's ops are; and a task's logits the same bits alone or among others."""
    base = ["train.task_threads=1", "model.filters=8"]
    fast_config = small_config(*base, "train.channels_last=never", "train.fft_conv=on")
    batch = random_batch(fast_config, seed=7, tasks=4)
    want = MetaLearner(fast_config, dtype=torch.float64).evaluate(batch).logits
    nnpack_calls.clear()
    fast = MetaLearner(fast_config)
    got_fast = fast.evaluate(batch).logits
    assert fast.paths.fft_conv and nnpack_calls
    slow = MetaLearner(small_config(*base, "train.channels_last=first_order",
                                    "train.fft_conv=off", "train.fused_kernels=off"))
    got_slow = slow.evaluate(batch).logits
    error_fast, error_slow = ((g.double() - want).abs().max() / want.abs().max()
                              for g in (got_fast, got_slow))
    assert error_fast <= max(3 * error_slow, 1e-5), (error_fast, error_slow)
    alone = fast.evaluate(batch.slice(2, 3)).logits
    assert torch.equal(alone[0], got_fast[2])


@needs_nnpack
def test_results_do_not_depend_on_task_threads_with_fourier_convolutions(one_intra_op_thread,
                                                                         nnpack_calls):
    results = []
    for task_threads in (1, 2):
        config = small_config("train.task_group=1", "train.channels_last=never",
                              "train.fft_conv=on", f"train.task_threads={task_threads}")
        results.append(meta_grads(config, torch.float32)[1])
    assert nnpack_calls
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k


def test_on_without_nnpack_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(fft_conv, "supported", lambda: False)
    with pytest.raises(UserError, match="train.fft_conv = on.*NNPACK"):
        MetaLearner(small_config("train.fft_conv=on"))
    assert not MetaLearner(small_config("train.fft_conv=auto")).paths.fft_conv
