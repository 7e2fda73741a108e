"""2x2 max-pool that keeps only its indices for the backward.

`F.max_pool2d` saves its input for the backward, although the backward only needs the indices
and the input's shape. In second-order MAML every support pass's graph lives until the
meta-gradient is taken, so on mini-ImageNet that is a needless 34 MB per inner step and task
(25 x 48 x 84 x 84 float32, the batch-norm output). This pool computes the same values and
gradients with torch's own kernels and saves the int64 indices alone; the backward is written
with torch ops, so its own derivative (second order) comes from torch too.

On the CPU the forward pools a channels-last copy: torch's NCHW max-pool kernel is not
vectorised and took 20% of a miniimagenet-5w5s second-order step (55 ms for 25 x 48 x 84 x 84
on one thread, vs 17 ms for copy, channels-last pool and copies back); the step went from 7.9 to
7.0 s measured interleaved.
"""

from __future__ import annotations

import torch
from torch._C._functorch import is_batchedtensor

_K, _PAD, _DIL = [2, 2], [0, 0], [1, 1]


def _pool_with_indices(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and indices of the 2x2 pool of NCHW-contiguous x, in NCHW."""
    if x.device.type == "cpu" and not is_batchedtensor(x):
        # torch's NCHW max-pool kernel is 3-4x slower on the CPU than copying to channels-last,
        # pooling there and copying values and indices back
        x = x.contiguous(memory_format=torch.channels_last)
        out, indices = torch.ops.aten.max_pool2d_with_indices(x, _K, _K, _PAD, _DIL, False)
        return out.contiguous(), indices.contiguous()
    return torch.ops.aten.max_pool2d_with_indices(x, _K, _K, _PAD, _DIL, False)


class _MaxPool2x2(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _pool_with_indices(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        (x,) = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])
        ctx.shape, ctx.dtype, ctx.device = x.shape, x.dtype, x.device

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        (indices,) = ctx.saved_tensors
        # the kernel reads only the shape (and layout) of its `self`: a zero-stride stand-in
        stand_in = torch.zeros((), dtype=ctx.dtype, device=ctx.device).expand(ctx.shape)
        return torch.ops.aten.max_pool2d_with_indices_backward(
            grad, stand_in, _K, _K, _PAD, _DIL, False, indices)


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """F.max_pool2d(x, 2) for NCHW-contiguous x, without saving x; other layouts go to torch."""
    if x.dim() == 4 and x.is_contiguous():
        return _MaxPool2x2.apply(x)[0] if x.requires_grad else _pool_with_indices(x)[0]
    return torch.nn.functional.max_pool2d(x, 2)
