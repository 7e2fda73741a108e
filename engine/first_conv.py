"""The first convolution of single-channel images (Omniglot) with its weight gradient as one
batched matrix product.

The first layer's input is data, so its backward needs only the weight and bias gradients.
For one input channel torch's CPU convolution backward computes the weight gradient several
times slower than a batched matmul of the output gradient with the unfolded 3x3 patches of the
images, and its derivative (in the second-order outer backward) adds a transposed convolution
for the images' gradient that nothing uses; for three channels torch's is faster, so this
serves one channel only. The backward is written in differentiable torch ops, so the outer
backward differentiates it as any other part of the inner loop. It serves the second-order
support passes of the per-task loop (engine/model.py, `lean_second_order`), where it measured
faster; first-order passes measured the same or slower (benchmarks/README.md). Same values as
F.conv2d(x, weight, bias, padding=1) and its gradients up to float rounding (tested against
the reference path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.tasks import has_nhwc_strides


def applies(x: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> bool:
    """Images without a graph, one channel per group (per task when tasks are folded into the
    channels, engine/grouped.py), a 3x3 kernel. The caller keeps it to plain autograd
    (engine/model.py asks only with `lean_second_order`, never under torch.func)."""
    return (x.shape[1] == groups and weight.shape[1] == 1 and not x.requires_grad
            and weight.shape[-2:] == (3, 3))


def weight_grad(x: torch.Tensor, g: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """d loss / d weight of a 3x3, padding-1 convolution: sum over images and positions of
    the output gradient g [N, O, H, W] times the input patch at that position; with `groups`,
    one input channel per group and each group's weights from its own output channels."""
    n, o = g.shape[0], g.shape[1] // groups
    cols = F.unfold(x, 3, padding=1)  # [N, G*9, H*W], a group's 9 rows together
    if groups == 1 and has_nhwc_strides(g):  # then [N, H*W, O] is a view
        gw = torch.bmm(cols, g.permute(0, 2, 3, 1).reshape(n, -1, o)).sum(0).t()
        return gw.reshape(o, 1, 3, 3)
    gw = torch.bmm(g.reshape(n * groups, o, -1), cols.view(n * groups, 9, -1).transpose(1, 2))
    return gw.view(n, groups * o, 9).sum(0).view(groups * o, 1, 3, 3)


class _FirstConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups):
        ctx.save_for_backward(x)
        ctx.groups = groups
        return F.conv2d(x, weight, bias, padding=1, groups=groups)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return None, weight_grad(x, g, ctx.groups), g.sum((0, 2, 3)), None


def first_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               groups: int = 1) -> torch.Tensor:
    return _FirstConv.apply(x, weight, bias, groups)
