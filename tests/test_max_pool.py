"""engine/max_pool.py against F.max_pool2d: values, which element of a tied window takes the
gradient, and second derivatives, for even and odd sizes."""

import pytest
import torch
import torch.nn.functional as F

from engine.max_pool import max_pool2x2


def _input(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x[:, :, :4, :4] = 0.5  # constant windows: ties, as on Omniglot's blank background
    x[0, 0, 4:6, 4:6] = torch.tensor([[1.0, 2.0], [2.0, 2.0]], dtype=torch.float64)
    return x


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (3, 2, 7, 9), (1, 4, 7, 6)])
def test_same_as_torch_max_pool(shape):
    x = _input(shape, sum(shape))
    r = torch.randn(x.shape[0], x.shape[1], x.shape[2] // 2, x.shape[3] // 2,
                    dtype=torch.float64)

    def run(pool):
        xx = x.clone().requires_grad_()
        y = pool(xx)
        (gx,) = torch.autograd.grad((y * r).sum() + (y ** 3).sum(), xx, create_graph=True)
        (ggx,) = torch.autograd.grad((gx * gx).sum(), xx)
        return y, gx, ggx

    expected = run(lambda t: F.max_pool2d(t, 2))
    for pool in (max_pool2x2, lambda t: max_pool2x2(t, compact=True)):
        for a, e in zip(run(pool), expected, strict=True):
            assert torch.equal(a, e)
    with torch.no_grad():  # the pass without a graph takes the same pooling
        assert torch.equal(max_pool2x2(x), F.max_pool2d(x, 2))


def test_nan_propagates():
    x = torch.zeros(1, 1, 4, 4, requires_grad=True)
    with torch.no_grad():
        x[0, 0, 1, 1] = float("nan")
    y = max_pool2x2(x)
    assert torch.isnan(y[0, 0, 0, 0]) and torch.isnan(F.max_pool2d(x, 2)[0, 0, 0, 0])


@pytest.mark.parametrize("width", [84, 300])
def test_second_order_graph_keeps_one_byte_per_output(width):
    """What a compact pool's second-order graph (support passes) holds: no float input and,
    for rows narrower than 255, no int64 indices (8 bytes per output) either, at either
    derivative order; wider rows fall back to the indices and still pool like torch."""
    x = torch.randn(2, 3, 6, width, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 3, 3, width // 2, dtype=torch.float64)
    y = max_pool2x2(x, compact=True)
    (gx,) = torch.autograd.grad((y * r).sum() + (y ** 3).sum(), x, create_graph=True)
    saved, seen, stack = [], set(), [gx.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        saved += [t for t in getattr(node, "saved_tensors", ()) if isinstance(t, torch.Tensor)]
        stack += [n for n, _ in node.next_functions]
    pooled = [t for t in saved if t.shape == y.shape]
    assert pooled, "the pool's backward saved nothing shaped like its output"
    want = torch.uint8 if width < 255 else torch.int64
    assert {t.dtype for t in pooled if t.dtype != torch.float64} == {want}
    assert not any(t.shape == x.shape for t in saved)
    assert torch.equal(y, F.max_pool2d(x, 2))
    (ggx,) = torch.autograd.grad((gx * gx).sum(), x)
    xx = x.detach().requires_grad_()
    yy = F.max_pool2d(xx, 2)
    (gxx,) = torch.autograd.grad((yy * r).sum() + (yy ** 3).sum(), xx, create_graph=True)
    assert torch.equal(ggx, torch.autograd.grad((gxx * gxx).sum(), xx)[0])
