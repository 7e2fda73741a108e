"""engine/first_conv.py against torch's own convolution: values, the weight and bias gradients
and their derivatives (the second-order outer backward differentiates them), in NCHW and
channels-last, one group or two (tasks folded into the channels, engine/grouped.py), float64.
The whole step through it is compared with the reference path in test_reference_path.py
(quickstart images have one channel)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.first_conv import applies, first_conv


def _inputs(layout, groups):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, groups, 9, 9, generator=gen, dtype=torch.float64).contiguous(
        memory_format=layout)
    w = torch.randn(4 * groups, 1, 3, 3, generator=gen, dtype=torch.float64,
                    requires_grad=True)
    b = torch.randn(4 * groups, generator=gen, dtype=torch.float64, requires_grad=True)
    return x, w, b


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_gradients_and_their_derivatives_equal_torch_conv(layout, groups):
    x, w, b = _inputs(layout, groups)

    def objective(conv):
        y = conv(x, w, b)
        return (torch.tanh(y.contiguous(memory_format=layout)) ** 2).sum()

    def ours(x, w, b):
        return first_conv(x, w, b, groups)

    def theirs(x, w, b):
        return F.conv2d(x, w, b, padding=1, groups=groups)

    torch.testing.assert_close(ours(x, w, b), theirs(x, w, b), rtol=0, atol=1e-12)
    g_ours = torch.autograd.grad(objective(ours), (w, b), create_graph=True)
    g_torch = torch.autograd.grad(objective(theirs), (w, b), create_graph=True)
    for a, c in zip(g_ours, g_torch):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    # second order: differentiate a function of the gradients, as the outer backward does
    h_ours = torch.autograd.grad(sum((g ** 3).sum() for g in g_ours), (w, b))
    h_torch = torch.autograd.grad(sum((g ** 3).sum() for g in g_torch), (w, b))
    for a, c in zip(h_ours, h_torch):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)
    # and by finite differences
    assert torch.autograd.gradgradcheck(lambda w, b: ours(x, w, b), (w, b))


def test_applies_to_data_with_one_channel_per_group_only():
    w1 = torch.zeros(4, 1, 3, 3)
    assert applies(torch.zeros(2, 1, 5, 5), w1)
    assert not applies(torch.zeros(2, 3, 5, 5), torch.zeros(4, 3, 3, 3))
    assert not applies(torch.zeros(2, 1, 5, 5, requires_grad=True), w1)
    assert applies(torch.zeros(2, 3, 5, 5), torch.zeros(12, 1, 3, 3), groups=3)
    assert not applies(torch.zeros(2, 6, 5, 5), torch.zeros(12, 2, 3, 3), groups=3)
