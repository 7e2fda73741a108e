"""LSLR rates and per-step batch norm (BNWB, BNRS), checked against the reference."""

from __future__ import annotations

import torch

from engine.bn_running import MOMENTUM as BN_MOMENTUM
from engine.config import resolve
from engine.learner import MetaLearner
from engine.model import NetSpec
from tests.helpers import grads, random_batch, small_config
from tests.reference_maml import net, task_objective


def test_lslr_has_a_rate_per_tensor_and_step_and_they_learn():
    cfg = resolve("omniglot-5w1s", overrides=["model.filters=8", "train.meta_batch=2",
                                              "maml_pp.first_order_epochs=0"])
    learner = MetaLearner(cfg)
    rates = learner.meta.lrs
    assert len(rates) == 10 and all(v.shape == (5,) for v in rates.values())
    assert all(torch.all(v == 0.1) for v in rates.values())
    batch = random_batch(cfg)
    learner.train_step(batch, 0)
    g = grads(learner)
    scale = max(g[f"lslr.{k}"].abs().max() for k in rates)
    for k in rates:
        gk = g[f"lslr.{k}"]
        if k.startswith("conv") and k.endswith("bias"):
            # A conv bias feeds batch norm, which subtracts the batch mean: its support gradient,
            # and so its rate's meta-gradient, is zero up to rounding (same in the reference).
            assert gk.abs().max() < 1e-4 * scale, k
        else:
            assert torch.all(gk.abs() > 0), k
    for _ in range(3):
        learner.train_step(batch, 0)
    for k, v in rates.items():
        if not (k.startswith("conv") and k.endswith("bias")):
            assert torch.all(v != 0.1), k


def test_lslr_off_keeps_every_rate_at_inner_lr():
    cfg = small_config("maml_pp.lslr=false", "train.inner_lr=0.05")
    learner = MetaLearner(cfg)
    for _ in range(3):
        learner.train_step(random_batch(cfg), 0)
    assert all(torch.all(v == 0.05) for v in learner.meta.lrs.values())
    assert not any(k.startswith("lslr") for k, _ in learner.named_meta_parameters())


def test_step_i_uses_bn_row_i():
    # first order, final-step loss only: rows 0..N-2 enter only through the (detached) inner
    # gradients, so only the last row gets a meta-gradient
    cfg = small_config()
    learner = MetaLearner(cfg, dtype=torch.float64)
    learner.meta_loss(random_batch(cfg).to("cpu", torch.float64), [0, 0, 1], second_order=False)
    g = grads(learner)
    for i in range(cfg.model.stages):
        w = g[f"bn.bn{i}.weight"]
        assert w.shape == (3, cfg.model.filters)
        assert torch.all(w[:2] == 0) and w[2].abs().sum() > 0
    # with MSL every step's query loss uses its own row, so every row gets a gradient
    learner.meta_loss(random_batch(cfg).to("cpu", torch.float64), [0.3, 0.3, 0.4], False)
    g = grads(learner)
    assert all(g["bn.bn0.weight"][r].abs().sum() > 0 for r in range(3))


def test_bn_row_selection_matches_reference_forward():
    cfg = small_config()
    learner = MetaLearner(cfg, dtype=torch.float64)
    with torch.no_grad():
        for v in learner.meta.bn.values():
            v.copy_(torch.randn(v.shape, dtype=v.dtype))
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    from engine.model import forward

    for step in range(5):  # 3 and 4 beyond inner_steps: reuse the last row
        got, _ = forward(learner.meta.adapted, learner.meta.bn, x, step)
        row = min(step, 2)
        single = {k: v[row:row + 1] for k, v in learner.meta.bn.items()}
        ref = net(learner.meta.adapted, single, x, 0, cfg.model.stages)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_running_sets_update_per_step_and_evaluation_leaves_them():
    cfg = small_config("train.meta_batch=2")
    learner = MetaLearner(cfg, dtype=torch.float64)
    batch = random_batch(cfg).to("cpu", torch.float64)
    weights = [0.0, 0.0, 1.0]  # step 0 and 1: support forward only; step 2: support and query
    learner.meta_loss(batch, weights, second_order=False)
    # reference: fold every forward's statistics, task by task, into the set of its step
    expected = {k: v.clone() for k, v in MetaLearner(cfg, dtype=torch.float64).meta.running.items()}
    for t in range(batch.size):
        stats = []
        adapted = {k: v.detach().clone().requires_grad_() for k, v in learner.meta.adapted.items()}
        task_objective(adapted, learner.meta.bn, learner.meta.lrs, batch.x_support[t],
                       batch.y_support[t], batch.x_query[t], batch.y_query[t], 3, weights, False,
                       cfg.model.stages, stats=stats)
        for step, layer, m, v in stats:
            for key, value in ((f"bn{layer}.running_mean", m), (f"bn{layer}.running_var", v)):
                expected[key][step] = (1 - BN_MOMENTUM) * expected[key][step] + BN_MOMENTUM * value
    for k, v in learner.meta.running.items():
        torch.testing.assert_close(v, expected[k], rtol=1e-10, atol=1e-12)
    assert not torch.equal(learner.meta.running["bn0.running_mean"][0],
                           learner.meta.running["bn0.running_mean"][1])
    for mode in ("batch", "running"):
        learner.config.maml_pp.bn_eval_stats = mode
        before = {k: v.clone() for k, v in learner.meta.running.items()}
        learner.evaluate(batch, steps=5)
        assert all(torch.equal(v, before[k]) for k, v in learner.meta.running.items())


def test_running_eval_normalises_with_the_steps_running_set():
    cfg = small_config("maml_pp.bn_eval_stats=running", "train.eval_inner_steps=4")
    learner = MetaLearner(cfg, dtype=torch.float64)
    batch = random_batch(cfg).to("cpu", torch.float64)
    learner.train_step(batch, 0)  # running sets now differ from their init
    result = learner.evaluate(batch)
    for t in range(batch.size):
        adapted = {k: v.detach().clone().requires_grad_() for k, v in learner.meta.adapted.items()}
        _, _, logits = task_objective(adapted, learner.meta.bn, learner.meta.lrs,
                                      batch.x_support[t], batch.y_support[t], batch.x_query[t],
                                      batch.y_query[t], 4, [0, 0, 0, 1], False, cfg.model.stages,
                                      running=learner.meta.running)
        torch.testing.assert_close(result.logits[t], logits.detach(), rtol=1e-9, atol=1e-9)


def test_shared_bn_rows_when_per_step_techniques_are_off():
    cfg = small_config("maml_pp.bn_per_step_affine=false", "maml_pp.bn_per_step_stats=false")
    spec = NetSpec.from_config(cfg)
    learner = MetaLearner(cfg)
    assert learner.meta.bn["bn0.weight"].shape == (1, spec.filters)
    assert learner.meta.running["bn0.running_mean"].shape == (1, spec.filters)
    learner.train_step(random_batch(cfg), 0)
