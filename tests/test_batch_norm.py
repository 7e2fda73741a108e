"""engine/batch_norm.py against torch's own batch norm: values, batch statistics, first and
second derivatives (every cotangent of the first backward: grad_input, weight and bias)."""

import pytest
import torch
import torch.nn.functional as F

from engine.batch_norm import batch_norm_pool, batch_norm_train
from tests.helpers import bn_second_derivatives

EPS = 1e-5


def _torch_bn(x, w, b):
    return F.batch_norm(x, None, None, w, b, training=True, eps=EPS)


def _lean_bn(x, w, b):
    return batch_norm_train(x, w, b, EPS)[0]


@pytest.mark.parametrize("shape", [(5, 4, 6, 6), (3, 3, 5, 7), (2, 6, 1, 3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_torch_to_second_order(shape, channels_last):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(shape[1], generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[1], generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(shape, generator=g, dtype=torch.float64)
    y_ref, first_ref, second_ref = bn_second_derivatives(_torch_bn, x, w, b, r)
    y, first, second = bn_second_derivatives(_lean_bn, x, w, b, r)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    for a, e in zip(first + second, first_ref + second_ref, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_only_grad_input_used_and_statistics():
    """The inner loop uses grad_input alone (weight/bias cotangents absent), and reads the
    batch statistics native_batch_norm returns."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    y, mean, invstd = batch_norm_train(x, w, b, EPS)
    torch.testing.assert_close(mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(invstd, (x.var((0, 2, 3), unbiased=False) + EPS).rsqrt())

    def outer(bn):
        (gx,) = torch.autograd.grad((bn(x, w, b) ** 2).sum(), x, create_graph=True)
        return torch.autograd.grad((gx * gx.detach().cos()).sum(), (x, w, b))

    for a, e in zip(outer(_lean_bn), outer(_torch_bn), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_finite_differences():
    """The second derivative against a finite difference of the first (torch-independent)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)

    def first(x, w):
        (gx,) = torch.autograd.grad((_lean_bn(x, w, b) * r).sum() ** 2, x, create_graph=True)
        return (gx * r.flip(0)).sum()

    dx, dw = torch.autograd.grad(first(x, w), (x, w))
    h = 1e-6
    for idx in [(0, 0, 0, 0), (1, 1, 2, 3), (2, 0, 3, 1)]:
        e = torch.zeros_like(x)
        e[idx] = h
        fd = (first(x + e, w) - first(x - e, w)) / (2 * h)
        assert abs(fd.item() - dx[idx].item()) < 1e-5 * max(1.0, abs(fd.item()))
    e = torch.zeros_like(w)
    e[1] = h
    fd = (first(x, w + e) - first(x, w - e)) / (2 * h)
    assert abs(fd.item() - dw[1].item()) < 1e-5 * max(1.0, abs(fd.item()))


def _saved(root: torch.Tensor) -> list[torch.Tensor]:
    """Tensors the custom autograd Functions of root's graph keep."""
    saved, seen, stack = [], set(), [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        saved += [t for t in getattr(node, "saved_tensors", ()) if isinstance(t, torch.Tensor)]
        stack += [n for n, _ in node.next_functions]
    return saved


@pytest.mark.parametrize("shape", [(5, 4, 6, 6), (3, 3, 5, 7), (2, 2, 4, 300)])
def test_batch_norm_pool_matches_torch_to_second_order(shape):
    """batch_norm_pool against F.batch_norm then F.max_pool2d: values, statistics, first and
    second derivatives; and its second-order graph keeps one full-size tensor (the input), the
    pooled gradient and one-byte offsets, not the full-size gradient at the batch-norm output."""
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1).requires_grad_()
    w = torch.randn(shape[1], generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape[1], generator=g, dtype=torch.float64, requires_grad=True)
    pooled = (shape[0], shape[1], shape[2] // 2, shape[3] // 2)
    r = torch.randn(pooled, generator=g, dtype=torch.float64)
    y_ref, first_ref, second_ref = bn_second_derivatives(
        lambda *a: F.max_pool2d(_torch_bn(*a), 2), x, w, b, r)
    y, first, second = bn_second_derivatives(lambda *a: batch_norm_pool(*a, EPS)[0], x, w, b, r)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    for a, e in zip(first + second, first_ref + second_ref, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
    _, mean, invstd = batch_norm_pool(x, w, b, EPS)
    torch.testing.assert_close(mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(invstd, (x.var((0, 2, 3), unbiased=False) + EPS).rsqrt())

    y, _, _ = batch_norm_pool(x, w, b, EPS)
    (gx,) = torch.autograd.grad((y * r).sum() + (y ** 3).sum(), x, create_graph=True)
    saved = _saved(gx)
    full = {t.untyped_storage().data_ptr() for t in saved if t.shape == x.shape}
    assert full == {x.untyped_storage().data_ptr()}
    offsets = [t for t in saved if t.shape == pooled and not t.is_floating_point()]
    assert offsets and {t.dtype for t in offsets} == {
        torch.uint8 if shape[-1] < 255 else torch.int64}
