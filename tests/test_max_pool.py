"""engine/max_pool.py against F.max_pool2d: values, which element of a tied window takes the
gradient, second derivatives and the one-byte offsets, for even and odd sizes."""

import pytest
import torch
import torch.nn.functional as F

from engine.max_pool import gather, max_pool2x2, pool, scatter


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

    for a, e in zip(run(max_pool2x2), run(lambda t: F.max_pool2d(t, 2)), strict=True):
        assert torch.equal(a, e)
    with torch.no_grad():  # the pass without a graph takes the same pooling
        assert torch.equal(max_pool2x2(x), F.max_pool2d(x, 2))


def test_nan_propagates():
    x = torch.zeros(1, 1, 4, 4, requires_grad=True)
    with torch.no_grad():
        x[0, 0, 1, 1] = float("nan")
    y = max_pool2x2(x)
    assert torch.isnan(y[0, 0, 0, 0]) and torch.isnan(F.max_pool2d(x, 2)[0, 0, 0, 0])



@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (3, 2, 7, 9), (1, 2, 6, 300)])
def test_offsets_rebuild_torch_indices(shape):
    """The one-byte offsets (indices themselves for rows of 255 or more) give back torch's
    indices; scatter and gather are the pool's backward and its transpose."""
    x = _input(shape, 7)
    _, indices = F.max_pool2d(x, 2, return_indices=True)
    out, codes = pool(x, "codes")
    assert torch.equal(out, F.max_pool2d(x, 2))
    assert codes.dtype == (torch.uint8 if shape[-1] < 255 else torch.int64)
    g = torch.randn(indices.shape, dtype=torch.float64)
    xx = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad((F.max_pool2d(xx, 2) * g).sum(), xx)
    assert torch.equal(scatter(g, codes, x.shape, x.dtype), expected)
    assert torch.equal(gather(x, codes), F.max_pool2d(x, 2))
