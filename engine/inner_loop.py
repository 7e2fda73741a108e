"""One task's inner loop and its query losses, as a pure function of the meta-parameters.

The same function serves both meta-batch implementations: called per task it is the plain loop,
wrapped in `torch.func.vmap` it runs a whole meta-batch at once. Inner gradients come from
`torch.func.grad`, which composes with vmap and with the outer `loss.backward()` (second order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import grad

from engine.model import BatchStats, Params, forward


@dataclass(frozen=True)
class InnerPlan:
    """What one call of `inner_loop` computes (static, so vmap sees plain Python values)."""

    steps: int  # inner steps to take
    loss_steps: tuple[int, ...]  # steps whose query loss is computed (MSL weight > 0)
    second_order: bool  # keep inner gradients in the graph
    track_stats: bool  # return batch statistics for the running sets
    use_running: bool = False  # normalise with running sets (evaluation, bn_eval_stats=running)


def _support_loss(adapted: Params, bn: Params, x: torch.Tensor, y: torch.Tensor, step: int,
                  running: Params | None, track: bool) -> tuple[torch.Tensor, BatchStats]:
    logits, stats = forward(adapted, bn, x, step, running, track)
    return F.cross_entropy(logits, y), stats


def inner_loop(
    adapted: Params,
    bn: Params,
    lrs: Params,
    running: Params,
    x_support: torch.Tensor,
    y_support: torch.Tensor,
    x_query: torch.Tensor,
    y_query: torch.Tensor,
    plan: InnerPlan,
) -> tuple[torch.Tensor, torch.Tensor, list[BatchStats]]:
    """Adapt on the support set; return (query losses at plan.loss_steps, final query logits,
    batch statistics of every forward pass in order: support 0, [query 0], support 1, ...).

    theta_{i+1} = theta_i - alpha[tensor][i] * grad_support(theta_i); the query loss of step i
    uses theta_{i+1} and BN row i. First order computes the inner gradient on detached inputs,
    so no graph is built for it at all.
    """
    run = running if plan.use_running else None
    fast = adapted
    losses, stats = [], []
    logits = None
    for i in range(plan.steps):
        if plan.second_order:
            g, s = grad(_support_loss, has_aux=True)(fast, bn, x_support, y_support, i, run,
                                                     plan.track_stats)
        else:
            detached = {k: v.detach() for k, v in fast.items()}
            bn_d = {k: v.detach() for k, v in bn.items()}
            g, s = grad(_support_loss, has_aux=True)(detached, bn_d, x_support, y_support, i,
                                                     run, plan.track_stats)
        stats.append(s)
        fast = {k: w - lrs[k][min(i, lrs[k].shape[0] - 1)] * g[k] for k, w in fast.items()}
        if i in plan.loss_steps:
            logits, s = forward(fast, bn, x_query, i, run, plan.track_stats)
            losses.append(F.cross_entropy(logits, y_query))
            stats.append(s)
    assert logits is not None, "the final step must be among loss_steps"
    return torch.stack(losses), logits, stats


def stats_rows(plan: InnerPlan) -> list[int]:
    """The inner step (BN running set) each entry of inner_loop's statistics list belongs to."""
    rows = []
    for i in range(plan.steps):
        rows.append(i)
        if i in plan.loss_steps:
            rows.append(i)
    return rows
