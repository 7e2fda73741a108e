"""3x3 convolutions as NNPACK's 16x16 Fourier transform, where that is faster than oneDNN.

A 3x3, stride-1, padding-1 convolution's forward, its input gradient (the output gradient
convolved with the kernel flipped and transposed), its weight gradient (the images convolved
with the output gradient as the kernel, images and channels swapped) and the terms the
second-order backward adds (the same three kinds) are all convolutions. NNPACK, in every CPU
build of torch, computes a convolution in the Fourier domain, 16x16 tiles at a time, with
fewer operations than oneDNN's direct convolution (benchmarks/fft_conv.py). Each backward here
is written in these functions, so every order of derivative stays on them.

Where it applies (`applies`): float32 NCHW feature maps of at least MIN_CHANNELS channels on
the CPU, one group, and an output NNPACK computes with its Fourier transform by its own rule
(convolution-output.c: more than four 8x8 Winograd tiles per 16x16 one, e.g. 13-14, 28, 42, 84
pixels a side). At other sizes (7, 10, 21 pixels) it picks its 8x8 Winograd transform, whose
float32 error measured 5-15x oneDNN's: those stay oneDNN's. The Fourier transform's float32
error measured a quarter of oneDNN's; it is another rounding of the same function (float64,
and every check against the reference, stay on torch's convolution).

Threads: NNPACK runs a call on a thread pool of its own, sized once by the intra-op thread
count of the first thread to call it. `available` makes that first call at one thread, so
every call runs inline on its caller (no second pool spinning against OpenMP's); a caller with
several intra-op threads splits its images across them (`_nnpack`), the same bits however split.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from engine.task_threads import helper_pool, run_split

_state: dict[str, bool | None] = {"available": None}
_lock = threading.Lock()
TILE = 16  # NNPACK's Fourier tile a side: weight gradients go in blocks of TILE - 2
MIN_CHANNELS = 16  # input channels from which it is faster (not for 1- and 3-channel images)
SPLIT_MIN_ELEMENTS = 2**16  # input elements from which a call splits across intra-op threads


def supported() -> bool:
    """NNPACK built into torch and supported by this CPU (also initialises it: until then
    every NNPACK call fails)."""
    return bool(torch._nnpack_available())


def available() -> bool:
    """`supported`, and NNPACK's pool made (once). Its first convolution sizes that pool by the
    calling thread's intra-op thread count, so it is made here, at one thread: each call then
    runs inline on its caller."""
    with _lock:
        if _state["available"] is None:
            ok = supported()
            if ok:
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    x = torch.zeros(1, 1, 14, 14)
                    torch._nnpack_spatial_convolution(x, torch.zeros(1, 1, 3, 3), None, [1, 1])
                finally:
                    torch.set_num_threads(threads)
            _state["available"] = ok
        return bool(_state["available"])


def _tiles(size: int, per_tile: int) -> int:
    return -(-size // per_tile)


def fourier(h: int, w: int) -> bool:
    """Whether NNPACK computes a 3x3 convolution with an h x w output by its 16x16 Fourier
    transform (its rule: more than four times as many 8x8 Winograd tiles, 6 outputs a side,
    as 16x16 Fourier ones, 14 a side)."""
    return _tiles(h, 6) * _tiles(w, 6) > 4 * _tiles(h, 14) * _tiles(w, 14)


def applies(x: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    """Float32 NCHW CPU feature maps (not images: a direct convolution of one or three
    channels is cheaper than the transforms), one group, a 3x3 kernel, a Fourier-sized output."""
    return (groups == 1 and x.device.type == "cpu" and x.dtype == torch.float32
            and x.dim() == 4 and x.is_contiguous() and x.shape[1] >= MIN_CHANNELS
            and weight.shape[-2:] == (3, 3)
            and fourier(x.shape[-2], x.shape[-1]) and available())


def _nnpack(x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None,
            padding: int = 1) -> torch.Tensor:
    """NNPACK's convolution of x, its images split across the calling thread's intra-op
    threads where there are several (NNPACK's own pool has one thread): each image's output
    is computed alone, so the result is the same however they are split."""
    x, kernel = x.contiguous(), kernel.contiguous()
    n = x.shape[0]
    pad = [padding, padding]
    if torch.get_num_threads() <= 1 or x.numel() < SPLIT_MIN_ELEMENTS:
        return torch._nnpack_spatial_convolution(x, kernel, bias, pad)
    out = x.new_empty((n, kernel.shape[0], *(x.shape[d] + 2 * padding - kernel.shape[d] + 1
                                             for d in (2, 3))))

    def part(a: int, b: int) -> None:
        torch.ops.aten._nnpack_spatial_convolution.out(x[a:b], kernel, bias, pad, [1, 1],
                                                        out=out[a:b])

    run_split(n, part, True, helper_pool)
    return out


def _flipped(weight: torch.Tensor) -> torch.Tensor:
    """The kernel of a convolution's input gradient: in and out channels swapped, 3x3 flipped."""
    return weight.flip(2, 3).transpose(0, 1)


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _nnpack(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        gx = conv3x3(g, _flipped(weight)) if need_x else None
        gw = _WeightGrad.apply(x, g) if need_w else None
        gb = g.sum((0, 2, 3)) if need_b and ctx.has_bias else None
        return gx, gw, gb


def weight_grad(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """d loss / d weight [K, C, 3, 3] of the convolution of x [N, C, H, W] given its output
    gradient g [N, K, H, W]: for each weight position, the sum over images and positions of g
    times the shifted input. That is the images convolved with g as the kernel, images and
    channels swapped, a 3x3 output. NNPACK's Fourier tile takes a kernel up to 14 a side (16
    with the 3x3 output), so g is cut into 14x14 blocks (zero-padded), each beside the 16x16
    block of padded input it meets, and the blocks join the images as the summed axis."""
    n, c, h, w = x.shape
    k = g.shape[1]
    side = TILE - 2
    bh, bw = _tiles(h, side), _tiles(w, side)
    if bh * bw == 1:
        return _nnpack(x.transpose(0, 1), g.transpose(0, 1), None).transpose(0, 1)
    gp = F.pad(g, (0, bw * side - w, 0, bh * side - h))
    xp = F.pad(x, (1, bw * side - w + 1, 1, bh * side - h + 1))
    gb = gp.unfold(2, side, side).unfold(3, side, side)  # [N, K, bh, bw, 14, 14]
    xb = xp.unfold(2, TILE, side).unfold(3, TILE, side)  # [N, C, bh, bw, 16, 16]
    gb = gb.transpose(0, 1).reshape(k, n * bh * bw, side, side)
    xb = xb.transpose(0, 1).reshape(c, n * bh * bw, TILE, TILE)
    return _nnpack(xb, gb, None, padding=0).transpose(0, 1)


class _WeightGrad(torch.autograd.Function):
    """`weight_grad`, differentiable again (its derivatives are convolutions of x and g)."""

    @staticmethod
    def forward(ctx, x, g):
        ctx.save_for_backward(x, g)
        return weight_grad(x, g)

    @staticmethod
    def backward(ctx, gg):
        x, g = ctx.saved_tensors
        need_x, need_g = ctx.needs_input_grad
        gx = conv3x3(g, _flipped(gg)) if need_x else None
        g_g = conv3x3(x, gg) if need_g else None
        return gx, g_g


def conv3x3(x: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1), for inputs `applies` takes."""
    return _Conv.apply(x, weight, bias)

