"""Small builders shared by the engine tests: configs and random task batches."""

from __future__ import annotations

import torch

from engine.config import resolve
from engine.learner import MetaLearner
from engine.msl import msl_weights
from engine.tasks import TaskBatch


def small_config(*overrides: str):
    base = ["model.filters=4", "model.stages=2", "train.meta_batch=3", "train.inner_steps=3",
            "train.eval_inner_steps=3", "data.ways=3", "data.shots=2", "data.queries=2"]
    return resolve("quickstart", overrides=base + list(overrides))


def random_batch(cfg, seed: int = 0, tasks: int | None = None) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    c, h, w = cfg.image_shape
    b = tasks or cfg.train.meta_batch
    ways, shots, q = cfg.data.ways, cfg.data.shots, cfg.data.queries
    xs = torch.randn(b, ways * shots, c, h, w, generator=g)
    xq = torch.randn(b, ways * q, c, h, w, generator=g)
    ys = torch.stack([torch.randperm(ways, generator=g).repeat_interleave(shots) for _ in range(b)])
    yq = torch.stack([torch.randperm(ways, generator=g).repeat_interleave(q) for _ in range(b)])
    return TaskBatch(xs, ys, xq, yq)


def bn_second_derivatives(bn, x, w, b, r, all_three: bool = True):
    """(y, first, second) of batch norm `bn(x, w, b)` (or its pooled output): y, the gradients
    (x, w, b) of a loss of y, and the gradients (x, w, b) of a function of those first
    derivatives: of all three, or (`all_three` False) of the input gradient alone, whose weight
    and bias cotangents are then None, as in second-order MAML."""
    y = bn(x, w, b)
    loss = (y * r).sum() + 0.1 * (y ** 3).sum()
    gx, gw, gb = torch.autograd.grad(loss, (x, w, b), create_graph=True)
    outer = gx.sin().sum()
    if all_three:
        outer = outer + 0.3 * (gw ** 2).sum() + 0.2 * (gb ** 3).sum()
    return y, (gx, gw, gb), torch.autograd.grad(outer, (x, w, b))


def learned(learner: MetaLearner) -> dict[str, torch.Tensor]:
    return dict(learner.named_meta_parameters())


def grads(learner: MetaLearner) -> dict[str, torch.Tensor]:
    return {k: v.grad.clone() for k, v in learner.named_meta_parameters()}


def flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in d.values()])


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    """`mamlpp ARGV` through the real entry point, in this process: (exit code, stdout,
    stderr)."""
    from mamlpp_tui import cli

    code = 0
    try:
        cli.main(list(argv))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str) -> str:
    """A usage or user error as the CLI must give it: exit 2, one line `error: ...`, no
    traceback. Returns the line."""
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def meta_grads(config, dtype) -> tuple[MetaLearner, dict[str, torch.Tensor]]:
    """A fresh learner and its meta-gradients of one second-order step (epoch 0's MSL
    weights) on random_batch(seed=5)."""
    learner = MetaLearner(config, dtype=dtype)
    cfg = learner.config
    weights = msl_weights(0, cfg.train.inner_steps, cfg.maml_pp.msl_epochs, cfg.maml_pp.msl)
    learner.meta_loss(random_batch(cfg, seed=5), weights, True)
    return learner, grads(learner)
