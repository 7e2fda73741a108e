"""Meta-gradients against a plain reference implementation and finite differences."""

from __future__ import annotations

import pytest
import torch

from engine.learner import MetaLearner
from engine.msl import msl_weights
from tests.helpers import flat, grads, random_batch, small_config
from tests.reference_maml import task_objective


def reference_meta_objective(learner, batch, weights, second_order, overrides=None):
    """mean over tasks of the reference task objective, at the learner's (or given) params."""
    overrides = overrides or {}

    def group(prefix, current):
        return {k: overrides.get(f"{prefix}.{k}", v) for k, v in current.items()}

    params = group("net", learner.meta.adapted)
    bn = group("bn", learner.meta.bn)
    lrs = group("lslr", learner.meta.lrs)
    total = 0
    for t in range(batch.size):
        obj, _, _ = task_objective(params, bn, lrs, batch.x_support[t], batch.y_support[t],
                                   batch.x_query[t], batch.y_query[t],
                                   learner.config.train.inner_steps, weights, second_order,
                                   learner.spec.stages)
        total = total + obj
    return total / batch.size


def _setup(*overrides):
    cfg = small_config("train.meta_batch=2", *overrides)
    learner = MetaLearner(cfg, dtype=torch.float64)
    batch = random_batch(cfg).to("cpu", torch.float64)
    # move away from the symmetric init so LSLR and BN rows differ per step
    gen = torch.Generator().manual_seed(0)  # seeded: the test must see the same point each run
    with torch.no_grad():
        for v in learner.meta.lrs.values():
            v.add_(torch.rand(v.shape, generator=gen, dtype=v.dtype) * 0.05)
        for v in learner.meta.bn.values():
            v.add_(torch.randn(v.shape, generator=gen, dtype=v.dtype) * 0.1)
    return cfg, learner, batch


def test_loss_matches_reference_forward():
    cfg, learner, batch = _setup()
    w = msl_weights(1, 3, cfg.maml_pp.msl_epochs)
    _, loss = learner.meta_loss(batch, w, second_order=True)
    ref = reference_meta_objective(learner, batch, w, True)
    assert abs(loss - ref.item()) < 1e-12 * abs(ref.item())


@pytest.mark.parametrize("fused_pool_min", [0, 2**40], ids=["bn-pool-fused", "bn-pool-apart"])
def test_second_order_gradient_matches_finite_differences(fused_pool_min, monkeypatch):
    """Both ways a second-order support pass can run batch norm and the max-pool (fused above
    model.FUSED_POOL_MIN elements, apart below) give the reference's meta-gradient."""
    monkeypatch.setattr("engine.model.FUSED_POOL_MIN", fused_pool_min)
    cfg, learner, batch = _setup()
    w = msl_weights(1, 3, cfg.maml_pp.msl_epochs)
    learner.meta_loss(batch, w, second_order=True)
    g = grads(learner)
    named = dict(learner.named_meta_parameters())
    gen = torch.Generator().manual_seed(1)
    # Small steps: max-pool and LeakyReLU make the inner gradient piecewise smooth, so a large
    # step can cross a switch of the pooling argmax; float64 keeps rounding error ~1e-9.
    eps = 1e-7
    for _ in range(3):
        d = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in named.items()}
        with torch.no_grad():
            plus = {k: (named[k] + eps * d[k]).requires_grad_() for k in named}
            minus = {k: (named[k] - eps * d[k]).requires_grad_() for k in named}
        fd = (reference_meta_objective(learner, batch, w, True, plus)
              - reference_meta_objective(learner, batch, w, True, minus)) / (2 * eps)
        analytic = sum((g[k] * d[k]).sum() for k in named)
        assert abs(analytic.item() - fd.item()) < 1e-6 * max(1.0, abs(fd.item())), (analytic, fd)


def test_second_order_differs_from_first_order():
    cfg, learner, batch = _setup()
    w = msl_weights(0, 3, cfg.maml_pp.msl_epochs)
    learner.meta_loss(batch, w, second_order=True)
    g2 = flat(grads(learner))
    learner.meta_loss(batch, w, second_order=False)
    g1 = flat(grads(learner))
    assert (g2 - g1).norm() > 1e-3 * g2.norm()


def test_first_order_gradient_equals_gradient_with_detached_inner_grads():
    cfg, learner, batch = _setup()
    w = msl_weights(2, 3, cfg.maml_pp.msl_epochs)
    learner.meta_loss(batch, w, second_order=False)
    got = grads(learner)
    named = dict(learner.named_meta_parameters())
    ref = reference_meta_objective(learner, batch, w, second_order=False)
    expected = torch.autograd.grad(ref, list(named.values()))
    for k, e in zip(named, expected):
        torch.testing.assert_close(got[k], e, rtol=1e-9, atol=1e-14, msg=k)


@pytest.mark.parametrize("epoch, second", [(0, False), (1, False), (2, True), (5, True)])
def test_derivative_order_annealing_switches_at_first_order_epochs(epoch, second):
    cfg = small_config("maml_pp.first_order_epochs=2", "train.meta_batch=1")
    learner = MetaLearner(cfg, dtype=torch.float64)
    assert learner.train_step(random_batch(cfg, tasks=1), epoch).second_order is second


def test_second_order_off_is_first_order_forever():
    cfg = small_config("maml_pp.second_order=false", "maml_pp.first_order_epochs=0")
    learner = MetaLearner(cfg)
    assert not learner.train_step(random_batch(cfg), 99).second_order


def test_grad_clip_clamps_network_meta_gradient():
    cfg = small_config("train.grad_clip=0.001")
    learner = MetaLearner(cfg, dtype=torch.float64)
    batch = random_batch(cfg).to("cpu", torch.float64)
    _, loss = learner.meta_loss(batch, [0, 0, 1], second_order=False)
    raw = grads(learner)
    assert max(v.abs().max() for k, v in raw.items() if not k.startswith("lslr")) > 0.001
    before = {k: v.detach().clone() for k, v in learner.named_meta_parameters()}
    learner.outer_step(loss, 1e-3)
    for k, v in learner.named_meta_parameters():
        if not k.startswith("lslr"):
            assert v.grad.abs().max() <= 0.001
            torch.testing.assert_close(v.grad, raw[k].clamp(-0.001, 0.001))
        assert v.grad is not None and before[k].shape == v.shape


def test_non_finite_loss_refuses_the_update():
    from engine.learner import NonFiniteLossError

    cfg = small_config()
    learner = MetaLearner(cfg)
    batch = random_batch(cfg)
    batch.x_query[0, 0, 0, 0, 0] = float("nan")
    before = {k: v.detach().clone() for k, v in learner.named_meta_parameters()}
    with pytest.raises(NonFiniteLossError):
        learner.train_step(batch, 0)
    for k, v in learner.named_meta_parameters():
        assert torch.equal(v.detach(), before[k])
