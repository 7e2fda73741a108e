"""One task's inner loop and its query losses, as a pure function of the meta-parameters.

The same function serves both meta-batch implementations: called per task it is the plain loop,
wrapped in `torch.func.vmap` it runs a whole meta-batch at once. Inner gradients come from
`torch.func.grad`, which composes with vmap and with the outer backward (second order), or, for
one task at a time, from plain `torch.autograd.grad` behind the same interface (faster on CPU
than torch.func's wrapped ops: benchmarks/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import grad as torch_func_grad

from engine.model import BatchStats, Params, forward
from engine.tasks import has_nhwc_strides


@dataclass(frozen=True)
class InnerPlan:
    """What one call of `inner_loop` computes (static, so vmap sees plain Python values)."""

    steps: int  # inner steps to take
    loss_steps: tuple[int, ...]  # steps whose query loss is computed (MSL weight > 0)
    second_order: bool  # keep inner gradients in the graph
    track_stats: bool  # return batch statistics for the running sets
    use_running: bool = False  # normalise with running sets (evaluation, bn_eval_stats=running)
    functional: bool = True  # torch.func.grad (needed under vmap) or plain torch.autograd.grad
    groups: int = 1  # tasks folded into the channels (engine/grouped.py); 1: one task
    fused: bool = False  # engine/fused_cpu.py's kernels where they apply (plain autograd only)
    fft_conv: bool = False  # engine/fft_conv.py's convolutions where they apply (likewise)


def task_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of one task's logits [n, ways] (a scalar), or of folded tasks' logits
    [tasks, n, ways] (one mean per task)."""
    if logits.dim() == 2:
        return F.cross_entropy(logits, y)
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)


def _support_loss(adapted: Params, bn: Params, x: torch.Tensor, y: torch.Tensor, step: int,
                  running: Params | None, track: bool, lean: bool = False,
                  stats_out: torch.Tensor | None = None, groups: int = 1,
                  fused: bool = False, fft: bool = False) -> tuple[torch.Tensor, BatchStats]:
    logits, stats = forward(adapted, bn, x, step, running, track, lean_second_order=lean,
                            stats_out=stats_out, groups=groups, fused=fused, fft=fft)
    loss = task_losses(logits, y)
    # folded tasks: the sum of their losses, whose gradient is each task's own
    return (loss if groups == 1 else loss.sum()), stats


def _query_loss(adapted: Params, bn: Params, x: torch.Tensor, y: torch.Tensor, step: int,
                running: Params | None, track: bool, stats_out: torch.Tensor | None = None,
                groups: int = 1, fused: bool = False, fft: bool = False):
    logits, stats = forward(adapted, bn, x, step, running, track, stats_out=stats_out,
                            groups=groups, fused=fused, fft=fft)
    loss = task_losses(logits, y)
    return (loss if groups == 1 else loss.sum()), (loss, logits, stats)


@dataclass
class _Kept:
    """What one task's inner loop keeps from its passes, in buffers allocated before the first
    pass (plain autograd; torch.func's transforms need fresh outputs).

    Why: glibc serves a small request from whatever free chunk fits, so a tensor created while
    a pass's activations are alive lands among them; kept after the pass (batch statistics,
    query gradients, the loss) it splits the region the pass freed, the next query pass's
    activations (100 MB each on mini-ImageNet) no longer fit there, and the heap grows: one
    miniimagenet-5w5s task grew it by 1.5 GB for a 1.3 GB peak of live tensors."""

    stats: torch.Tensor | None  # [passes, stages, 2, filters]
    losses: torch.Tensor  # [loss steps]
    logits: torch.Tensor  # the latest query logits
    grads: list[tuple[Params, Params]]  # per loss step: query-loss gradients (fast, bn)

    @classmethod
    def allocate(cls, fast: Params, bn: Params, x_query: torch.Tensor, plan: InnerPlan,
                 objective: bool) -> _Kept:
        stages, filters = len(bn) // 2, bn["bn0.weight"].shape[-1]
        passes = plan.steps + len(plan.loss_steps)
        stats = (x_query.new_empty(passes, stages, 2, filters) if plan.track_stats else None)
        grads = [({k: torch.empty_like(v) for k, v in fast.items()},
                  {k: torch.empty_like(v) for k, v in bn.items()})
                 for _ in plan.loss_steps] if objective else []
        g, n = plan.groups, x_query.shape[0]
        ways = fast["linear.bias"].shape[-1] // g
        logits = x_query.new_empty(g, n, ways) if g > 1 else x_query.new_empty(n, ways)
        losses = x_query.new_empty(len(plan.loss_steps), *((g,) if g > 1 else ()))
        return cls(stats, losses, logits, grads)

    def stats_out(self, p: int) -> torch.Tensor | None:
        return None if self.stats is None else self.stats[p]

    def stats_list(self) -> list[BatchStats]:
        assert self.stats is not None
        return [[(m, v) for m, v in s] for s in self.stats]


def _copy_into(into: Params, values: Params) -> Params:
    return {k: into[k].copy_(v) for k, v in values.items()}


def _autograd_grad(fn, argnums: int | tuple[int, ...] = 0, has_aux: bool = False):
    """`torch.func.grad`'s interface on plain autograd, for the per-task loop: the same
    gradients without functorch's per-op wrapping. Inputs that carry a graph give gradients
    that do too (second order); detached ones are differentiated on the spot (first order)."""
    nums = argnums if isinstance(argnums, tuple) else (argnums,)

    def wrapped(*args):
        with torch.enable_grad():
            args = list(args)
            inputs, create_graph = [], False
            for n in nums:
                args[n] = dict(args[n])
                for k, v in args[n].items():
                    if v.requires_grad:
                        create_graph = True
                    else:
                        args[n][k] = v = v.detach().requires_grad_()
                    inputs.append(v)
            out, aux = fn(*args) if has_aux else (fn(*args), None)
            flat = torch.autograd.grad(out, inputs, create_graph=create_graph)
        grads, it = [], iter(flat)
        for n in nums:
            grads.append({k: next(it) for k in args[n]})
        g = tuple(grads) if isinstance(argnums, tuple) else grads[0]
        return (g, _detach_all(aux)) if has_aux else g

    return wrapped


def _detach_all(tree):
    """Aux outputs as func.grad returns them: values only, so no graph outlives the call."""
    if isinstance(tree, torch.Tensor):
        return tree.detach()
    if isinstance(tree, (list, tuple)):
        return type(tree)(_detach_all(t) for t in tree)
    return tree


def _like_channels_last(params: Params) -> Params:
    """Conv weights in channels-last too: with NCHW weights every channels-last conv reorders
    its weight (a copy per call) and each inner update mixes layouts. Same numbers, a few
    percent faster (benchmarks/README.md)."""
    return {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
            for k, v in params.items()}


def _detached(params: Params) -> Params:
    return {k: v.detach() for k, v in params.items()}


def _dot(params: Params, grads: Params) -> torch.Tensor:
    return sum((params[k] * grads[k]).sum() for k in params)


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
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[BatchStats], torch.Tensor]:
    """Adapt on the support set; return (query losses at plan.loss_steps, final query logits,
    batch statistics of every forward pass in order: support 0, [query 0], support 1, ...,
    the meta-objective: zero without `weights`).

    theta_{i+1} = theta_i - alpha[tensor][i] * grad_support(theta_i); the query loss of step i
    uses theta_{i+1} and BN row i. First order computes the inner gradient on detached inputs,
    so no graph is built for it at all.

    With `weights` (training, one per loss step) the returned objective has the meta-gradient
    of sum_j w_j L_query_j, but no query graph is kept: each query loss is differentiated at
    once with respect to its fast weights and the BN parameters, and the objective is
    sum_j w_j (<theta_{i+1}, dL_j/dtheta_{i+1}> + <bn, dL_j/dbn>) with those derivatives
    constant. Backpropagating it through theta_{i+1} (the support chain) gives exactly the
    meta-gradient, while the query forwards (15 images per class on mini-ImageNet, most of a
    step's activations) are freed as soon as they are used.
    """
    run = running if plan.use_running else None
    grad = torch_func_grad if plan.functional else _autograd_grad
    # batch norm's lean second derivative (engine/batch_norm.py) is a plain autograd.Function,
    # so it serves the per-task loop, not torch.func's transforms
    lean = not plan.functional
    fused = plan.fused and not plan.functional
    fft = plan.fft_conv and not plan.functional
    fast = adapted
    if not plan.functional and has_nhwc_strides(x_support):
        fast = _like_channels_last(fast)
    kept = None if plan.functional else _Kept.allocate(fast, bn, x_query, plan,
                                                       weights is not None)
    losses, stats = [], []
    logits = None
    objective = x_query.new_zeros(())
    for i in range(plan.steps):
        out = kept and kept.stats_out(len(stats))
        if plan.second_order:
            g, s = grad(_support_loss, has_aux=True)(fast, bn, x_support, y_support, i, run,
                                                     plan.track_stats, lean, out, plan.groups,
                                                     fused, fft)
        else:
            g, s = grad(_support_loss, has_aux=True)(_detached(fast), _detached(bn), x_support,
                                                     y_support, i, run, plan.track_stats,
                                                     False, out, plan.groups, fused, fft)
        stats.append(s)
        fast = {k: w - lrs[k][min(i, lrs[k].shape[0] - 1)] * g[k] for k, w in fast.items()}
        if i not in plan.loss_steps:
            continue
        out = kept and kept.stats_out(len(stats))
        if weights is None:
            logits, s = forward(fast, bn, x_query, i, run, plan.track_stats, stats_out=out,
                                groups=plan.groups, fused=fused, fft=fft)
            loss = task_losses(logits, y_query)
        else:
            (g_fast, g_bn), (loss, logits, s) = grad(_query_loss, argnums=(0, 1), has_aux=True)(
                _detached(fast), _detached(bn), x_query, y_query, i, run, plan.track_stats, out,
                plan.groups, fused, fft)
            if kept:
                g_fast, g_bn = (_copy_into(into, g)
                                for into, g in zip(kept.grads[len(losses)], (g_fast, g_bn)))
            term = weights[len(losses)] * (_dot(fast, g_fast) + _dot(bn, g_bn))
            objective = objective + term
        if kept:
            loss = kept.losses[len(losses)].copy_(loss)
            logits = kept.logits.copy_(logits)
        losses.append(loss)
        stats.append(s)
    assert logits is not None, "the final step must be among loss_steps"
    if kept:
        return kept.losses, logits, kept.stats_list() if plan.track_stats else stats, objective
    return torch.stack(losses), logits, stats, objective
