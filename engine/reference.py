"""MAML++ as the paper writes it: one task's inner loop and multi-step loss, in plain form.

This is the readable definition of what mamlpp computes, selectable as `train.impl =
"reference"`, and the yardstick every fast path (engine/inner_loop.py, engine/meta_batch.py:
the per-task loop, vmapped tasks, task threads, channels-last, fused batch norm) is tested
against to float64 rounding for every switch combination (tests/test_reference_path.py).
Nothing here is tuned for speed: plain torch ops, NCHW, one task at a time, autograd as written.

Antoniou, Edwards & Storkey, "How to train your MAML" (ICLR 2019), Sections 2 and 4, with the
choices of SPEC.md. For task b with support set S_b and query (target) set T_b:

    theta_0 = theta                                        (the meta-learned initialisation)
    theta_{i+1} = theta_i - alpha_{l,i} * grad_{theta_i} L_{S_b}(f(x; theta_i, gamma_i, beta_i))
                                                           MAML's inner update, eq. (1), with
                                                           LSLR's rate per layer l and step i
    L_b = sum_{i=0}^{N-1} v_i(e) * L_{T_b}(f(x; theta_{i+1}, gamma_i, beta_i))
                                                           MSL, eq. (3)
    (theta, gamma, beta, alpha) <- Adam step on (1/B) sum_b grad L_b, learning rate beta(e)
                                                           the meta-update, eq. (2)

The six techniques, and where each is in this file or next to it:

1. MSL, multi-step loss (Section 4, eq. 3): the query loss after every inner step counts with
   weight v_i(e); `engine.msl.msl_weights` gives them per epoch e (all 1/N at first, annealed
   to the final step, which alone counts from `msl_epochs` on). Below: `weights`.
2. DA, derivative-order annealing (Section 4): the inner gradient is itself differentiated
   (second order, `create_graph`) only from `first_order_epochs` on
   (`engine.schedule.second_order_at`); before, it is a constant (first order). Below:
   `second_order`.
3. BNRS, per-step batch-norm running statistics (Section 4): every forward pass at step i
   folds its batch's moments into running set i (`engine/bn_running.py`); with
   `bn_eval_stats = "running"` evaluation normalises step i with set i. Below: `moments`,
   `running`.
4. BNWB, per-step batch-norm weights and biases (Section 4): step i normalises with its own
   gamma_i, beta_i (one shared row with the switch off). Below: `_bn_row`.
5. LSLR, learned per-layer per-step learning rates (Section 4): alpha_{l,i}, one learnable
   scalar per adapted tensor l and step i, meta-learned with everything else (one fixed
   `inner_lr` with the switch off). Below: `_rate`.
6. CA, cosine annealing of the meta learning rate (Section 4):
   beta(e) = beta_min + (beta_max - beta_min) * (1 + cos(pi * e / epochs)) / 2,
   `engine.schedule.meta_lr`, applied by `MetaLearner.outer_step`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.bn_running import batch_moments
from engine.model import BN_EPS, LEAK, BatchStats, Params
from engine.tasks import TaskBatch


def _bn_row(bn: Params, layer: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BNWB: gamma_i, beta_i of `layer` (the last row beyond the stored steps)."""
    gamma, beta = bn[f"bn{layer}.weight"], bn[f"bn{layer}.bias"]
    return gamma[min(step, gamma.shape[0] - 1)], beta[min(step, beta.shape[0] - 1)]


def _rate(alpha: torch.Tensor, step: int) -> torch.Tensor:
    """LSLR: alpha_{l,i} (the last step's rate beyond the stored steps)."""
    return alpha[min(step, alpha.shape[0] - 1)]


def net(theta: Params, bn: Params, x: torch.Tensor, step: int, running: Params | None = None,
        moments: BatchStats | None = None) -> torch.Tensor:
    """f(x; theta, gamma_step, beta_step): stages of conv3x3 -> batch norm -> LeakyReLU(0.01)
    -> max-pool 2x2, then a linear classifier (SPEC 1). Batch norm uses the batch's statistics,
    or running set `step` when `running` is given; `moments` collects each stage's batch moments
    for the running sets."""
    stages = len(bn) // 2
    for layer in range(stages):
        x = F.conv2d(x, theta[f"conv{layer}.weight"], theta[f"conv{layer}.bias"], padding=1)
        if moments is not None:
            moments.append(batch_moments(x))
        gamma, beta = _bn_row(bn, layer, step)
        if running is None:
            x = F.batch_norm(x, None, None, gamma, beta, training=True, eps=BN_EPS)
        else:
            mean, var = running[f"bn{layer}.running_mean"], running[f"bn{layer}.running_var"]
            r = min(step, mean.shape[0] - 1)
            x = F.batch_norm(x, mean[r], var[r], gamma, beta, training=False, eps=BN_EPS)
        x = F.max_pool2d(F.leaky_relu(x, LEAK), 2)
    return F.linear(x.flatten(1), theta["linear.weight"], theta["linear.bias"])


def task_loss(theta: Params, bn: Params, alpha: Params, x_support: torch.Tensor,
              y_support: torch.Tensor, x_query: torch.Tensor, y_query: torch.Tensor,
              weights: list, second_order: bool, running: Params | None = None,
              track: bool = False):
    """One task's inner loop and multi-step loss.

    `weights` holds v_0..v_{N-1}; the query loss of step i is computed where v_i > 0 (and at
    the last step always). Returns (L_b = sum_i v_i L_{T_b,i}, the query losses computed, the
    last step's query logits, each forward pass's batch moments in order when `track`)."""
    steps = len(weights)
    passes: list[BatchStats] = []
    query_losses, logits = [], None
    objective = x_query.new_zeros(())
    for i in range(steps):
        moments = [] if track else None
        support_loss = F.cross_entropy(net(theta, bn, x_support, i, running, moments), y_support)
        passes += [moments] if track else []
        grads = torch.autograd.grad(support_loss, list(theta.values()),
                                    create_graph=second_order)
        theta = {k: w - _rate(alpha[k], i) * g for (k, w), g in zip(theta.items(), grads)}
        if i == steps - 1 or weights[i] > 0:
            moments = [] if track else None
            logits = net(theta, bn, x_query, i, running, moments)
            passes += [moments] if track else []
            loss = F.cross_entropy(logits, y_query)
            query_losses.append(loss)
            objective = objective + weights[i] * loss
    return objective, torch.stack(query_losses), logits, passes


def meta_batch(adapted: Params, bn: Params, lrs: Params, running: Params, batch: TaskBatch,
               steps: int, weights: list | None, second_order: bool, use_running: bool,
               track: bool, denominator: int):
    """Every task of the batch in turn. With `weights` (training), backpropagate
    L_b / denominator into the meta-parameters' `.grad`, task by task; without them
    (evaluation), adapt first order with the final step's query only and keep no graph.
    Returns (query losses [B, losses], final logits [B, Q, ways], per-task batch moments)."""
    train = weights is not None
    weights = list(weights) if train else [0.0] * (steps - 1) + [1.0]
    losses, logits, stats = [], [], []
    for b in range(batch.size):
        theta = adapted if train else {k: v.detach().requires_grad_() for k, v in adapted.items()}
        with torch.enable_grad():
            objective, q_losses, q_logits, passes = task_loss(
                theta, bn, lrs, batch.x_support[b], batch.y_support[b], batch.x_query[b],
                batch.y_query[b], weights, second_order and train,
                running if use_running else None, track)
            if train:
                (objective / denominator).backward()
        losses.append(q_losses.detach())
        logits.append(q_logits.detach())
        stats.append(passes)
    return torch.stack(losses), torch.stack(logits), stats
