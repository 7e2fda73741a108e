"""Several tasks as one network: each task's channels side by side, convolutions grouped.

Few-shot tasks on small images make tensors so small (5 x 64 x 14 x 14 on Omniglot) that a
per-task loop spends much of its time on the fixed cost of each op rather than on arithmetic.
Folding G tasks into the channel dimension runs them with one op where the loop runs G: the
images [G, n, C, H, W] become [n, G*C, H, W], conv weights [G*O, C, 3, 3] with groups=G, batch
norm's per-channel statistics are then per task and channel, the max-pool and LeakyReLU act
element by element, and the classifier is a batched matmul per task. Tasks never mix, so the
sum of their losses has each task's own gradient in its block of the folded weights, and the
folded meta-parameters (repeats of the shared ones) send the sum of the tasks' meta-gradients
back. This is what torch.func.vmap does with convolutions, without its per-op wrapping, so it
also takes plain autograd's lean second derivatives (engine/batch_norm.py).
"""

from __future__ import annotations

import torch

from engine.model import BatchStats, Params
from engine.tasks import TaskBatch, has_nhwc_strides


def fold_params(params: Params, groups: int) -> Params:
    """Per-task copies of the adapted tensors, stacked task-major along the first dim."""
    return {k: v.repeat(groups, *([1] * (v.dim() - 1))) for k, v in params.items()}


def fold_rows(params: Params, groups: int) -> Params:
    """Per-step channel rows [rows, C] (BN scale/shift, running sets) as [rows, G*C]."""
    return {k: v.repeat(1, groups) for k, v in params.items()}


def fold_images(x: torch.Tensor) -> torch.Tensor:
    """[G, n, C, H, W] -> [n, G*C, H, W], keeping each task's layout (NCHW or channels-last)."""
    g, n, c, h, w = x.shape
    folded = x.transpose(0, 1).reshape(n, g * c, h, w)
    # a reshape may return a view whose strides are neither layout (one channel per task)
    if has_nhwc_strides(x[0]):
        return folded.contiguous(memory_format=torch.channels_last)
    return folded.contiguous()


def fold_batch(batch: TaskBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return (fold_images(batch.x_support), batch.y_support, fold_images(batch.x_query),
            batch.y_query)


def unfold_stats(stats: list[BatchStats], groups: int) -> list[BatchStats]:
    """Per pass and stage (mean, var) of [G*C] as [G, C]: one row per task."""
    return [[(m.view(groups, -1), v.view(groups, -1)) for m, v in s] for s in stats]
