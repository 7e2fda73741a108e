"""A meta-batch three ways: the plain definition, a per-task loop and vmapped tasks.

`reference` is engine/reference.py, MAML++ as the paper writes it, one task at a time; the two
fast paths call `inner_loop` and must give its losses, logits, meta-gradients and batch
statistics to float64 rounding (tests/test_reference_path.py). The loop runs a backward per
part (second order then holds one part's graph at a time: the memory-lean path), optionally on
several task threads; a part is one task, or `group` tasks folded into one network's channels
(engine/grouped.py). vmap runs `chunk` tasks at once (convs become grouped convs over tasks).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.func import vmap

from engine import grouped, reference
from engine.inner_loop import InnerPlan, inner_loop
from engine.model import BatchStats, Params
from engine.task_threads import task_threads
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


def _run(meta: MetaParams, batch: TaskBatch, plan: InnerPlan, weights: torch.Tensor | None,
         vmapped: bool):
    args = (meta.adapted, meta.bn, meta.lrs, meta.running)
    data = (batch.x_support, batch.y_support, batch.x_query, batch.y_query)
    if vmapped:
        return vmap(lambda *d: inner_loop(*args, *d, plan, weights))(*data)
    if batch.size > 1:  # tasks folded into the channels, plain autograd
        g = batch.size
        running = grouped.fold_rows(meta.running, g) if plan.use_running else meta.running
        folded = (grouped.fold_params(meta.adapted, g), grouped.fold_rows(meta.bn, g),
                  meta.lrs, running)
        losses, logits, stats, objective = inner_loop(
            *folded, *grouped.fold_batch(batch), replace(plan, functional=False, groups=g),
            weights)
        return losses.t(), logits, grouped.unfold_stats(stats, g), objective
    # one task at a time: plain autograd, faster on CPU than torch.func's wrapped ops
    # (benchmarks/README.md)
    return inner_loop(*args, *(d[0] for d in data), replace(plan, functional=False), weights)


def _reference(meta: MetaParams, batch: TaskBatch, plan: InnerPlan,
               weights: torch.Tensor | None, denominator: int) -> BatchResult:
    """engine/reference.py, the plain definition, behind meta_batch's interface: `weights`
    holds the loss steps' weights, the reference takes one per inner step."""
    full = None
    if weights is not None:
        full = [0.0] * plan.steps
        for j, i in enumerate(plan.loss_steps):
            full[i] = weights[j]
    losses, logits, stats = reference.meta_batch(
        meta.adapted, meta.bn, meta.lrs, meta.running, batch, plan.steps, full,
        plan.second_order, plan.use_running, plan.track_stats, denominator)
    return BatchResult(losses, logits, stats)


def _unbatch(stats: list[BatchStats], b: int) -> list[BatchStats]:
    return [[(m[b], v[b]) for m, v in s] for s in stats]


def learnable(meta: MetaParams) -> list[torch.Tensor]:
    return [v for d in (meta.adapted, meta.bn, meta.lrs) for v in d.values() if v.requires_grad]


def _aliased(meta: MetaParams) -> MetaParams:
    """The learnable tensors as views made on the calling thread, for the task threads to use
    (and differentiate by) instead of the leaves themselves.

    Rule: a task thread never touches a leaf that requires grad. Torch finds (or first makes) a
    leaf's gradient accumulator under a per-tensor mutex and, inside it, takes the GIL to count a
    reference to the tensor's Python object; an autograd.Function's `apply` (engine/first_conv.py,
    batch_norm.py, max_pool.py) holds the GIL while it waits for that mutex. Two threads doing
    both on the same leaf deadlock (a test run hung in `fold_params`'s repeat against
    `first_conv`'s apply). A view's graph edge is its own node, reached without that mutex."""
    def alias(params: Params) -> Params:
        return {k: v.view_as(v) if v.requires_grad else v for k, v in params.items()}
    return replace(meta, adapted=alias(meta.adapted), bn=alias(meta.bn), lrs=alias(meta.lrs))


def meta_batch(
    meta: MetaParams,
    batch: TaskBatch,
    plan: InnerPlan,
    weights: torch.Tensor | None,
    impl: str,
    chunk: int = 0,
    denominator: int = 0,
    workers: int = 1,
    group: int = 1,
) -> BatchResult:
    """Run the inner loop of every task; with `weights`, add the meta-gradient of
    sum_b sum_i w_i L_query_i(b) / denominator (default: the batch size, i.e. the mean over
    tasks; the global meta-batch when the tasks are split across processes) to `.grad`.

    The parts (`group` tasks for the loop, folded when more than one; `chunk` tasks vmapped, by
    default the batch split evenly over the workers) may run on `workers` threads at once; each
    part's gradient is taken on its own and they are added to `.grad` in task order, so the
    result does not depend on how many threads ran or which finished first (at a fixed
    intra-op thread count)."""
    if impl not in ("loop", "vmap", "reference"):
        raise ValueError(f"meta_batch impl must be loop, vmap or reference, not {impl!r}")
    size = batch.size
    denominator = denominator or size
    if impl == "reference":
        return _reference(meta, batch, plan, weights, denominator)
    vmapped = impl == "vmap"
    step = group if not vmapped else (chunk or -(-size // max(1, min(workers, size))))
    params = learnable(meta) if weights is not None else []
    shared = _aliased(meta)
    inputs = learnable(shared) if weights is not None else []
    grad_enabled = torch.is_grad_enabled()
    # grad mode and autocast are per thread: the task threads take the caller's
    device = batch.x_support.device.type
    autocast_on = torch.is_autocast_enabled(device)
    autocast_dtype = torch.get_autocast_dtype(device)

    def run_part(start: int):
        with (torch.set_grad_enabled(grad_enabled),
              torch.autocast(device, dtype=autocast_dtype, enabled=autocast_on)):
            part = batch.slice(start, min(start + step, size))
            q_losses, q_logits, q_stats, objective = _run(shared, part, plan, weights, vmapped)
            if not vmapped and part.size == 1:
                q_losses, q_logits = q_losses[None], q_logits[None]
                q_stats = [[(m[None], v[None]) for m, v in s] for s in q_stats]
            grads = None
            if weights is not None:
                grads = torch.autograd.grad(objective.sum() / denominator, inputs,
                                            allow_unused=True)
            stats = [_unbatch(q_stats, b) for b in range(part.size)] if plan.track_stats else []
            return q_losses.detach(), q_logits.detach(), stats, grads

    losses, logits, stats = [], [], []
    with task_threads(workers, len(range(0, size, step))) as pool:
        for q_losses, q_logits, q_stats, grads in pool.map(run_part, range(0, size, step)):
            for p, g in zip(params, grads or (), strict=False):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad.add_(g)
            losses.append(q_losses)
            logits.append(q_logits)
            stats += q_stats
    return BatchResult(torch.cat(losses), torch.cat(logits), stats)
