"""An independent, deliberately plain MAML++ task objective for tests.

Written from SPEC.md without touching engine code paths: batch norm by its formula, inner
gradients with torch.autograd.grad, one task at a time. Tests compare the engine against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bn_formula(x, weight, bias, mean=None, var=None, eps=1e-5):
    if mean is None:
        mean = x.mean(dim=(0, 2, 3))
        var = ((x - mean[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))
    xhat = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + eps)
    return xhat * weight[None, :, None, None] + bias[None, :, None, None]


def net(p, bn, x, step, stages, running=None, stats=None):
    """Forward at inner step `step`; appends (step, mean, unbiased var) per stage to `stats`."""
    for i in range(stages):
        x = F.conv2d(x, p[f"conv{i}.weight"], p[f"conv{i}.bias"], padding=1)
        w, b = bn[f"bn{i}.weight"], bn[f"bn{i}.bias"]
        w, b = w[min(step, w.shape[0] - 1)], b[min(step, b.shape[0] - 1)]
        if stats is not None:
            n = x.shape[0] * x.shape[2] * x.shape[3]
            m = x.detach().mean(dim=(0, 2, 3))
            v = ((x.detach() - m[None, :, None, None]) ** 2).sum(dim=(0, 2, 3)) / (n - 1)
            stats.append((step, i, m, v))
        if running is not None:
            rm, rv = running[f"bn{i}.running_mean"], running[f"bn{i}.running_var"]
            r = min(step, rm.shape[0] - 1)
            x = bn_formula(x, w, b, rm[r], rv[r])
        else:
            x = bn_formula(x, w, b)
        x = F.leaky_relu(x, 0.01)
        x = F.max_pool2d(x, 2)
    x = x.reshape(x.shape[0], -1)
    return x @ p["linear.weight"].t() + p["linear.bias"]


def task_objective(p, bn, lrs, xs, ys, xq, yq, steps, weights, second_order, stages,
                   stats=None, running=None):
    """sum_i w_i * L_query_i for one task; returns (objective, per-step losses, final logits)."""
    fast = dict(p)
    names = list(p)
    losses, logits = [], None
    for i in range(steps):
        loss = F.cross_entropy(net(fast, bn, xs, i, stages, running, stats), ys)
        grads = torch.autograd.grad(loss, [fast[k] for k in names], create_graph=second_order)
        if not second_order:
            grads = [g.detach() for g in grads]
        fast = {k: fast[k] - lrs[k][min(i, lrs[k].shape[0] - 1)] * g for k, g in zip(names, grads)}
        if weights[i] > 0 or i == steps - 1:
            logits = net(fast, bn, xq, i, stages, running, stats)
            losses.append(F.cross_entropy(logits, yq))
        else:
            losses.append(None)
    total = sum(w * q for w, q in zip(weights, losses) if q is not None and w > 0)
    return total, losses, logits
