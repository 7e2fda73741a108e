"""Training-mode batch norm with a lean second derivative, for second-order MAML.

Second-order MAML differentiates the inner loop's batch-norm backward once more. torch's own
double backward of batch norm is a general formula of about 35 full-size tensor ops, a large
share of a second-order meta-iteration on the CPU (benchmarks/README.md). Written out
per channel, the same derivatives need only five channel sums, two of which the first backward
already has, and one more fused batch-norm backward:

With M values per channel, s = invstd, xh = (x - mean) s and per-channel means
A = <gy>, B = <gy xh> (from the first backward's weight/bias gradients), C = <ggx>, D = <ggx xh>
(from a batch-norm backward applied to ggx), E = <ggx gy>, the first backward is
gx = w s (gy - A - xh B), gw = M B, gb = M A, and its derivatives along (ggx, ggw, ggb) are

    d gy = w s (ggx - C - xh D) + ggw xh + ggb       (the batch-norm backward of ggx, plus)
    d w  = M s (E - A C - B D)
    d x  = a xh + b gy + c ggx + d0, per channel:
           a = -w s^2 (E - A C - 3 B D) - ggw s B,   b = -w s^2 D + ggw s,
           c = -w s^2 B,                            d0 = w s^2 (A D + B C) - ggw s A.

tests/test_batch_norm.py checks values, first and second derivatives against torch's batch norm.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from engine import fused_cpu, max_pool

# benchmarks/fused_kernels.py switches the compiled second derivative off to time torch's ops
COMPILED_SECOND_DERIVATIVE = True


def _channel(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against x [N, C, ...]."""
    return t.view(1, -1, *([1] * (x.dim() - 2)))


def _sum(t: torch.Tensor) -> torch.Tensor:
    return t.sum([d for d in range(t.dim()) if d != 1])


class _BatchNormBackward(torch.autograd.Function):
    """(gx, gw, gb) of training-mode batch norm, with the closed-form derivatives above. With
    `codes`, `g` is the gradient of the 2x2 max-pool of the output (engine/max_pool.py) and gy
    its scatter, rebuilt when needed rather than kept. `compiled`: the first derivative from
    engine/fused_cpu.py (with codes only), and the second too wherever ggx is given (it always
    is in second-order MAML); otherwise the second is the closed form above in torch's ops."""

    @staticmethod
    def forward(g, x, w, mean, invstd, eps, codes=None, compiled=False):
        if compiled:
            return fused_cpu.backward(g, x, w, mean, invstd, codes)
        gy = g if codes is None else max_pool.scatter(g, codes, x.shape, x.dtype)
        return torch.ops.aten.native_batch_norm_backward(
            gy, x, w, None, None, mean, invstd, True, eps, [True, True, True])

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        g, x, w, mean, invstd, eps, codes, compiled = inputs
        _, gw, gb = output
        ctx.eps, ctx.compiled = eps, compiled
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(g, x, w, mean, invstd, gw, gb, codes)

    @staticmethod
    @once_differentiable
    def backward(ctx, ggx, ggw, ggb):
        g, x, w, mean, invstd, gw, gb, codes = ctx.saved_tensors
        if ctx.compiled and ggx is not None and COMPILED_SECOND_DERIVATIVE:
            d_g, d_x, d_w = fused_cpu.backward2(g, x, w, mean, invstd, codes, gw, gb, ggx, ggw,
                                                ggb)
            return d_g, d_x, d_w, None, None, None, None, None
        gy = g if codes is None else max_pool.scatter(g, codes, x.shape, x.dtype)
        m = x.numel() // x.shape[1]
        s = invstd
        xh = (x - _channel(mean, x)) * _channel(s, x)
        d_gy = d_w = None
        a = b = c = d0 = None
        if ggx is not None:
            d_gy, sum_ggx_xh, sum_ggx = torch.ops.aten.native_batch_norm_backward(
                ggx, x, w, None, None, mean, invstd, True, ctx.eps, [True, True, True])
            big_a, big_b = gb / m, gw / m
            big_c, big_d = sum_ggx / m, sum_ggx_xh / m
            big_e = _sum(ggx * gy) / m
            ws2 = w * s * s
            d_w = m * s * (big_e - big_a * big_c - big_b * big_d)
            a = -ws2 * (big_e - big_a * big_c - 3 * big_b * big_d)
            b = -ws2 * big_d
            c = -ws2 * big_b
            d0 = ws2 * (big_a * big_d + big_b * big_c)
        if ggw is not None:
            g = ggw * s
            a = -g * gw / m if a is None else a - g * gw / m
            b = g if b is None else b + g
            d0 = -g * gb / m if d0 is None else d0 - g * gb / m
            term = xh * _channel(ggw, x)
            d_gy = term if d_gy is None else d_gy.add_(term)
        if ggb is not None:
            d_gy = (_channel(ggb, x).expand_as(x).clone(memory_format=torch.preserve_format)
                    if d_gy is None else d_gy.add_(_channel(ggb, x)))
        d_x = None
        if a is not None:
            d_x = xh.mul_(_channel(a, x))
            d_x.addcmul_(gy, _channel(b, x))
            if c is not None:
                d_x.addcmul_(ggx, _channel(c, x))
            d_x.add_(_channel(d0, x))
        if codes is not None and d_gy is not None:
            d_gy = max_pool.gather(d_gy, codes)
        return d_gy, d_x, d_w, None, None, None, None, None


class _BatchNormTrain(torch.autograd.Function):
    @staticmethod
    def forward(x, w, b, eps):
        return torch.native_batch_norm(x, w, b, None, None, True, 0.0, eps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, w, _, eps = inputs
        _, mean, invstd = output
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, invstd)
        ctx.save_for_backward(x, w, mean, invstd)

    @staticmethod
    def backward(ctx, gy, _mean, _invstd):
        x, w, mean, invstd = ctx.saved_tensors
        gx, gw, gb = _BatchNormBackward.apply(gy, x, w, mean, invstd, ctx.eps)
        return gx, gw, gb, None


class _BatchNormPool(torch.autograd.Function):
    """Batch norm and the 2x2 max-pool after it as one node, so that its backward takes the
    pooled gradient: a second-order graph then keeps that (a quarter of the elements) and the
    pool's one-byte offsets instead of the full-size gradient at the batch-norm output (34 of a
    miniimagenet-5w5s task's 170 MB per inner step). `compiled`: forward and first backward
    from engine/fused_cpu.py."""

    @staticmethod
    def forward(x, w, b, eps, compiled=False):
        if compiled:
            return fused_cpu.forward(x, w, b, eps)
        y, mean, invstd = torch.native_batch_norm(x, w, b, None, None, True, 0.0, eps)
        out, codes = max_pool.pool(y, "codes")
        return out, mean, invstd, codes

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, w, _, eps, compiled = inputs
        _, mean, invstd, codes = output
        ctx.eps, ctx.compiled = eps, compiled
        ctx.mark_non_differentiable(mean, invstd, codes)
        ctx.save_for_backward(x, w, mean, invstd, codes)

    @staticmethod
    def backward(ctx, g, _mean, _invstd, _codes):
        x, w, mean, invstd, codes = ctx.saved_tensors
        gx, gw, gb = _BatchNormBackward.apply(g, x, w, mean, invstd, ctx.eps, codes,
                                              ctx.compiled)
        return gx, gw, gb, None, None


def batch_norm_pool(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    eps: float, compiled: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`batch_norm_train` followed by F.max_pool2d(y, 2), for NCHW-contiguous x: (pooled y,
    batch mean, batch invstd), with graphs that keep a quarter of what the two apart keep.
    `compiled` (where engine/fused_cpu.py `applies`): its fused kernels compute the forward and
    first backward."""
    out, mean, invstd, _ = _BatchNormPool.apply(x, weight, bias, eps, compiled)
    return out, mean, invstd


def batch_norm_train(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.native_batch_norm(x, weight, bias, None, None, True, 0, eps): (y, batch mean,
    batch invstd), whose second derivative costs a fraction of torch's. Plain autograd only
    (the per-task loop); under torch.func transforms use torch's batch norm."""
    return _BatchNormTrain.apply(x, weight, bias, eps)
