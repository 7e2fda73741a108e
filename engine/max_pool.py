"""2x2 max-pool that does not keep its input for the backward.

`F.max_pool2d` saves its input for the backward, although the backward only needs where each
window's maximum was. In second-order MAML every support pass's graph lives until the
meta-gradient is taken, so on mini-ImageNet that is a needless 34 MB per inner step and task
(25 x 48 x 84 x 84 float32, the batch-norm output). `max_pool2x2` saves torch's int64 indices
alone. `pool(x, "codes")` gives each maximum's offset from its window's top-left element
instead (0, 1, W or W + 1: one byte while W < 255, a further 8x less), for the graphs that live
longest (engine/batch_norm.py's `batch_norm_pool`, second-order support passes); the indices
are rebuilt for torch's kernels when a backward needs them, which costs such a backward an
extra pass (a few percent of the pool's forward and backward) that passes whose graph dies
with them need not pay. The backward (`scatter`) and its derivative (`gather`) are autograd
Functions of each other, so no order of derivative keeps more than the offsets or indices.

On the CPU the forward pools a channels-last copy: torch's NCHW max-pool kernel is not
vectorised, and copying to channels-last, pooling there and copying back is several times
faster (benchmarks/README.md, "Measurements behind the engine's defaults").
"""

from __future__ import annotations

import torch
from torch._C._functorch import is_batchedtensor

_K, _PAD, _DIL = [2, 2], [0, 0], [1, 1]
MAX_CODED_WIDTH = 254  # offsets up to W + 1 fit a uint8


def _window_starts(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Flat index (h * W + w) of each 2x2 window's top-left element: [OH, OW] int64."""
    h, w = shape[-2], shape[-1]
    rows = torch.arange(h // 2, device=device) * (2 * w)
    return rows[:, None] + torch.arange(w // 2, device=device)[None, :] * 2


def _encode(indices: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """uint8 offsets (NCHW) of torch's flat max-pool indices; the indices themselves for rows
    too wide for a byte."""
    if shape[-1] > MAX_CODED_WIDTH:
        return indices.contiguous()
    offsets = indices.sub_(_window_starts(shape, indices.device))  # the kernel's own tensor
    return offsets.to(torch.uint8, memory_format=torch.contiguous_format)


def _decode(codes: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if codes.dtype != torch.uint8:
        return codes
    return _window_starts(shape, codes.device) + codes


def pool(x: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Values (NCHW) of the 2x2 pool of NCHW-contiguous x and where its maxima were: "codes"
    (one byte each), "indices" (torch's int64) or "none"."""
    if x.device.type == "cpu" and not is_batchedtensor(x):
        # torch's NCHW max-pool kernel is slower on the CPU than copying to channels-last,
        # pooling there and copying the values back (see the module docstring)
        x = x.contiguous(memory_format=torch.channels_last)
    out, indices = torch.ops.aten.max_pool2d_with_indices(x, _K, _K, _PAD, _DIL, False)
    if where == "none":
        return out.contiguous(), None
    return out.contiguous(), (_encode(indices, x.shape) if where == "codes"
                              else indices.contiguous())


def scatter(grad: torch.Tensor, codes: torch.Tensor, shape: torch.Size, dtype: torch.dtype):
    # the kernel reads only the shape (and layout) of its `self`: a zero-stride stand-in
    stand_in = torch.zeros((), dtype=dtype, device=grad.device).expand(shape)
    return torch.ops.aten.max_pool2d_with_indices_backward(
        grad, stand_in, _K, _K, _PAD, _DIL, False, _decode(codes, shape))


def gather(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    n, c = x.shape[0], x.shape[1]
    indices = _decode(codes, x.shape).reshape(n, c, -1)
    return x.reshape(n, c, -1).gather(2, indices).view(codes.shape)


class _MaxPool2x2(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pool(x, "indices")

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        (x,) = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])
        ctx.shape, ctx.dtype = x.shape, x.dtype

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        (indices,) = ctx.saved_tensors
        return _Scatter.apply(grad, indices, ctx.shape, ctx.dtype)


class _Scatter(torch.autograd.Function):
    """The pool's backward: each output's gradient to its window's maximum."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad, codes, shape, dtype):
        return scatter(grad, codes, shape, dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, codes, _, _ = inputs
        ctx.save_for_backward(codes)

    @staticmethod
    def backward(ctx, gg: torch.Tensor):
        (codes,) = ctx.saved_tensors
        return _Gather.apply(gg, codes), None, None, None


class _Gather(torch.autograd.Function):
    """The scatter's derivative: each window's maximum position read out."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, codes):
        return gather(x, codes)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, codes = inputs
        ctx.save_for_backward(codes)
        ctx.shape, ctx.dtype = x.shape, x.dtype

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (codes,) = ctx.saved_tensors
        return _Scatter.apply(g, codes, ctx.shape, ctx.dtype), None


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """F.max_pool2d(x, 2) for NCHW-contiguous x, saving torch's int64 indices and not x for the
    backward; other layouts go to torch. (Second-order support passes pool inside
    engine/batch_norm.py's `batch_norm_pool`, with one-byte offsets.)"""
    if x.dim() == 4 and x.is_contiguous():
        return _MaxPool2x2.apply(x)[0] if x.requires_grad else pool(x, "none")[0]
    return torch.nn.functional.max_pool2d(x, 2)
