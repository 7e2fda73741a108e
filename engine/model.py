"""The MAML++ base network, written functionally so fast weights can be passed in.

Four (or `stages`) blocks of conv3x3 -> batch norm -> LeakyReLU(0.01) -> max-pool 2x2, then a
linear classifier (computed as pool-then-LeakyReLU, which is the same function). Parameters live
in plain dicts rather than an nn.Module because the inner loop replaces the adapted tensors at
every step and `torch.func.vmap` batches them over tasks.

Batch norm is per step (SPEC 2.3/2.4): scale/shift and running statistics have one row per inner
step; step i uses row min(i, rows - 1), so a single shared row (technique switched off) and
evaluation with more steps than training both fall out of the same indexing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine import fft_conv, first_conv, fused_cpu
from engine.batch_norm import batch_norm_pool, batch_norm_train
from engine.config import Config
from engine.max_pool import max_pool2x2

BN_EPS = 1e-5
LEAK = 0.01
# Elements of a batch-norm input from which second-order passes fuse it with the max-pool
# (engine/batch_norm.py, batch_norm_pool): that keeps 3/4 of a full-size gradient out of the
# graph (34 MB per inner step on mini-ImageNet) at the cost of rebuilding it in the backward,
# which does not pay on Omniglot-size passes (graphs of a few MB): measured in
# benchmarks/README.md.
FUSED_POOL_MIN = 2**20

Params = dict[str, torch.Tensor]
# Per forward pass: one (mean, unbiased var) pair per stage, detached.
BatchStats = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class NetSpec:
    in_channels: int
    image_size: int
    filters: int
    stages: int
    ways: int
    affine_rows: int  # inner steps if BNWB else 1
    stat_rows: int  # inner steps if BNRS else 1

    @classmethod
    def from_config(cls, cfg: Config) -> NetSpec:
        c, size, _ = cfg.image_shape
        steps = cfg.train.inner_steps
        return cls(
            in_channels=c,
            image_size=size,
            filters=cfg.model.filters,
            stages=cfg.model.stages,
            ways=cfg.data.ways,
            affine_rows=steps if cfg.maml_pp.bn_per_step_affine else 1,
            stat_rows=steps if cfg.maml_pp.bn_per_step_stats else 1,
        )

    @property
    def features(self) -> int:
        return self.filters * (self.image_size >> self.stages) ** 2

    @property
    def adapted_names(self) -> list[str]:
        """The tensors the inner loop adapts (and LSLR gives rates to), in network order."""
        names = []
        for i in range(self.stages):
            names += [f"conv{i}.weight", f"conv{i}.bias"]
        return names + ["linear.weight", "linear.bias"]


def init_adapted(spec: NetSpec, generator: torch.Generator) -> Params:
    """Xavier-uniform weights, zero biases (SPEC 1)."""
    params: Params = {}
    channels = spec.in_channels
    for i in range(spec.stages):
        w = torch.empty(spec.filters, channels, 3, 3)
        torch.nn.init.xavier_uniform_(w, generator=generator)
        params[f"conv{i}.weight"] = w
        params[f"conv{i}.bias"] = torch.zeros(spec.filters)
        channels = spec.filters
    w = torch.empty(spec.ways, spec.features)
    torch.nn.init.xavier_uniform_(w, generator=generator)
    params["linear.weight"] = w
    params["linear.bias"] = torch.zeros(spec.ways)
    return params


def init_bn(spec: NetSpec) -> Params:
    """Per-step BN scale and shift, meta-learned in the outer loop only."""
    bn: Params = {}
    for i in range(spec.stages):
        bn[f"bn{i}.weight"] = torch.ones(spec.affine_rows, spec.filters)
        bn[f"bn{i}.bias"] = torch.zeros(spec.affine_rows, spec.filters)
    return bn


def row(step: int, rows: int) -> int:
    return min(step, rows - 1)


def forward(
    adapted: Params,
    bn: Params,
    x: torch.Tensor,
    step: int,
    running: Params | None = None,
    track: bool = False,
    lean_second_order: bool = False,
    stats_out: torch.Tensor | None = None,
    groups: int = 1,
    fused: bool = False,
    fft: bool = False,
) -> tuple[torch.Tensor, BatchStats]:
    """Logits for images x [n, C, H, W] at inner step `step`.

    With `running` given, normalise with that step's running set (evaluation with
    bn_eval_stats = "running"); otherwise with the batch's own statistics. With `track`, also
    return each stage's detached batch mean and unbiased variance for the running-set update.
    `lean_second_order` (plain autograd only, not under torch.func) takes batch norm and the
    max-pool after it from engine/batch_norm.py: a second derivative that costs a fraction of
    torch's, and a graph that keeps a quarter of the pooled layer's gradient. `stats_out`
    ([stages, 2, filters], plain autograd only) receives the tracked statistics instead of the
    returned list, so that no tensor created mid-pass outlives it (engine/inner_loop.py, `_Kept`).
    With `lean_second_order`, single-channel images also take the first convolution from
    engine/first_conv.py, whose weight gradient (and its derivative) is a batched matmul.
    `groups` > 1: x holds that many tasks side by side in its channels, with the weights
    stacked task-major (engine/grouped.py); the logits are then [groups, n, ways].
    `fused` (plain autograd only): batch norm and the max-pool of the passes that
    engine/fused_cpu.py's compiled kernels take (float32 NCHW on the CPU) run as those.
    `fft` (plain autograd only): the convolutions engine/fft_conv.py takes run as NNPACK's
    Fourier transform, their derivatives too.
    """
    stats: BatchStats = []
    stages = len(bn) // 2
    for i in range(stages):
        pooled = False  # batch_norm_pool took the max-pool too
        weight, bias = adapted[f"conv{i}.weight"], adapted[f"conv{i}.bias"]
        if i == 0 and lean_second_order and first_conv.applies(x, weight, groups):
            x = first_conv.first_conv(x, weight, bias, groups)
        elif fft and fft_conv.applies(x, weight, groups):
            x = fft_conv.conv3x3(x, weight, bias)
        else:
            x = F.conv2d(x, weight, bias, padding=1, groups=groups)
        w_bn, b_bn = bn[f"bn{i}.weight"], bn[f"bn{i}.bias"]
        w, b = w_bn[row(step, w_bn.shape[0])], b_bn[row(step, b_bn.shape[0])]
        compiled = fused and running is None and fused_cpu.applies(x)
        if running is not None:
            mean, var = running[f"bn{i}.running_mean"], running[f"bn{i}.running_var"]
            r = row(step, mean.shape[0])
            x = F.batch_norm(x, mean[r], var[r], w, b, training=False, eps=BN_EPS)
        elif track or lean_second_order or compiled:
            # batch norm computes the batch mean and 1/sqrt(var + eps) anyway: reuse them
            # rather than pay a separate mean/var pass (benchmarks/README.md); running sets
            # want unbiased var
            n = x.numel() // x.shape[1]
            if compiled or (lean_second_order and x.is_contiguous()
                            and x.numel() // groups >= FUSED_POOL_MIN):
                x, mean, invstd = batch_norm_pool(x, w, b, BN_EPS, compiled)
                pooled = True
            elif lean_second_order:
                x, mean, invstd = batch_norm_train(x, w, b, BN_EPS)
            else:
                x, mean, invstd = torch.native_batch_norm(x, w, b, None, None, True, 0.0, BN_EPS)
            if track:
                var = (invstd.detach().pow(-2) - BN_EPS) * (n / (n - 1))
                if stats_out is None:
                    stats.append((mean.detach(), var))
                else:
                    stats_out[i, 0].copy_(mean.detach())
                    stats_out[i, 1].copy_(var)
        else:
            x = F.batch_norm(x, None, None, w, b, training=True, eps=BN_EPS)
        # max-pool before LeakyReLU: equal values and gradients (LeakyReLU is increasing, so it
        # keeps each window's first maximum), with the activation on a quarter of the elements
        x = F.leaky_relu(x if pooled else max_pool2x2(x), LEAK)
    w, b = adapted["linear.weight"], adapted["linear.bias"]
    if groups == 1:
        return F.linear(x.flatten(1), w, b), stats
    features = x.reshape(x.shape[0], groups, -1).transpose(0, 1)  # [tasks, n, F]
    logits = torch.baddbmm(b.view(groups, 1, -1), features,
                           w.view(groups, -1, w.shape[-1]).transpose(1, 2))
    return logits, stats
