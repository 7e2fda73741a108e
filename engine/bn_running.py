"""BNRS, per-step batch-norm running statistics (SPEC 2.3): the technique's one home.

Each batch-norm layer keeps one running mean and variance per inner step (`stat_rows` of them:
the inner steps with BNRS on, a single shared set with it off). Every training forward pass at
inner step i, support and query alike, folds its batch's mean and unbiased variance into set i
with momentum 0.1, task after task in meta-batch order. Sets start at mean 0, variance 1.

With `bn_eval_stats = "batch"` (the default, the paper's numbers) the sets are tracked and saved
but never normalise anything; with "running", evaluation normalises inner step i with set i.
Evaluation never changes them.
"""

from __future__ import annotations

import torch

from engine.model import BatchStats, Params

MOMENTUM = 0.1


def init_running_stats(stages: int, stat_rows: int, filters: int) -> Params:
    stats: Params = {}
    for i in range(stages):
        stats[f"bn{i}.running_mean"] = torch.zeros(stat_rows, filters)
        stats[f"bn{i}.running_var"] = torch.ones(stat_rows, filters)
    return stats


def batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A pass's statistics as the running sets take them: per-channel mean and unbiased
    variance of the batch-norm input [n, C, H, W], detached."""
    x = x.detach()
    return x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=True)


def pass_steps(steps: int, loss_steps: tuple[int, ...]) -> list[int]:
    """The inner step of each forward pass of one task's inner loop, in order: the support
    pass of every step, followed by that step's query pass where its query loss is computed."""
    rows = []
    for i in range(steps):
        rows.append(i)
        if i in loss_steps:
            rows.append(i)
    return rows


@torch.no_grad()
def update_running(running: Params, step: int, stats: BatchStats) -> None:
    """Fold one forward pass's batch statistics into running set `step` (momentum 0.1); steps
    beyond the stored sets use the last one."""
    for i, (mean, var) in enumerate(stats):
        rm, rv = running[f"bn{i}.running_mean"], running[f"bn{i}.running_var"]
        r = min(step, rm.shape[0] - 1)
        rm[r].mul_(1 - MOMENTUM).add_(mean, alpha=MOMENTUM)
        rv[r].mul_(1 - MOMENTUM).add_(var, alpha=MOMENTUM)


def fold_meta_batch(running: Params, steps: int, loss_steps: tuple[int, ...],
                    per_task: list[list[BatchStats]]) -> None:
    """Fold a meta-batch's passes into the running sets: task by task, pass by pass."""
    rows = pass_steps(steps, loss_steps)
    for task_stats in per_task:
        for step, stats in zip(rows, task_stats, strict=True):
            update_running(running, step, stats)
