"""The two implementations of a meta-batch: a plain per-task loop and vmapped tasks.

Both call the same `inner_loop`, accumulate the same meta-gradient into `.grad` and return the
same per-task results, so the loop is the reference the vmapped path is tested against. The loop
runs a backward per task (second order then holds one task's graph at a time: the memory-lean
path); vmap runs `chunk` tasks at once (convs become grouped convs over tasks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import vmap

from engine.inner_loop import InnerPlan, inner_loop
from engine.model import BatchStats, Params
from engine.tasks import TaskBatch


@dataclass
class MetaParams:
    adapted: Params  # conv/linear tensors the inner loop adapts
    bn: Params  # per-step BN scale/shift
    lrs: Params  # LSLR rates, [steps] per adapted tensor
    running: Params  # per-step BN running statistics (buffers)


@dataclass
class BatchResult:
    losses: torch.Tensor  # [B, len(plan.loss_steps)] query losses, detached
    logits: torch.Tensor  # [B, ways*queries, ways] final-step query logits, detached
    stats: list[list[BatchStats]]  # per task, per forward pass (see inner_loop)
    accuracy: torch.Tensor | None = None  # [B] final-step query accuracy (set by the learner)


def _run(meta: MetaParams, batch: TaskBatch, plan: InnerPlan, vmapped: bool):
    args = (meta.adapted, meta.bn, meta.lrs, meta.running)
    data = (batch.x_support, batch.y_support, batch.x_query, batch.y_query)
    if vmapped:
        return vmap(lambda *d: inner_loop(*args, *d, plan))(*data)
    return inner_loop(*args, *(d[0] for d in data), plan)


def _unbatch(stats: list[BatchStats], b: int) -> list[BatchStats]:
    return [[(m[b], v[b]) for m, v in s] for s in stats]


def meta_batch(
    meta: MetaParams,
    batch: TaskBatch,
    plan: InnerPlan,
    weights: torch.Tensor | None,
    impl: str,
    chunk: int = 0,
    denominator: int = 0,
) -> BatchResult:
    """Run the inner loop of every task; with `weights`, backpropagate the meta-loss
    sum_b sum_i w_i L_query_i(b) / denominator (default: the batch size, i.e. the mean over
    tasks; the global meta-batch when the tasks are split across processes) into `.grad`."""
    size = batch.size
    denominator = denominator or size
    step = 1 if impl == "loop" else (chunk or size)
    losses, logits, stats = [], [], []
    for start in range(0, size, step):
        part = batch.slice(start, min(start + step, size))
        q_losses, q_logits, q_stats = _run(meta, part, plan, vmapped=impl != "loop")
        if impl == "loop":
            q_losses, q_logits = q_losses[None], q_logits[None]
            q_stats = [[(m[None], v[None]) for m, v in s] for s in q_stats]
        if weights is not None:
            (q_losses * weights).sum().div(denominator).backward()
        losses.append(q_losses.detach())
        logits.append(q_logits.detach())
        stats += [_unbatch(q_stats, b) for b in range(part.size)] if plan.track_stats else []
    return BatchResult(torch.cat(losses), torch.cat(logits), stats)
