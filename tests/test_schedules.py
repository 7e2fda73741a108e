"""MSL weights and the cosine meta learning rate against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.learner import MetaLearner
from engine.msl import msl_weights
from engine.schedule import meta_lr, second_order_at
from tests.helpers import random_batch, small_config


def reference_msl(epoch: int, n: int, e: int) -> np.ndarray:
    """The reference code's get_per_step_loss_importance_vector, transcribed."""
    w = np.ones(n) * (1.0 / n)
    decay = 1.0 / n / e
    floor = 0.03 / n
    for i in range(n - 1):
        w[i] = np.maximum(w[i] - epoch * decay, floor)
    w[-1] = np.minimum(w[-1] + epoch * (n - 1) * decay, 1.0 - (n - 1) * floor)
    return w


@pytest.mark.parametrize("e", [10, 15])
def test_msl_weights_follow_the_formula_then_switch_off(e):
    n = 5
    for epoch in range(0, e + 2):
        got = msl_weights(epoch, n, e)
        if epoch < e:
            np.testing.assert_allclose(got, reference_msl(epoch, n, e), rtol=0, atol=1e-15)
            assert abs(sum(got) - 1) < 1e-12
        else:
            assert got == [0.0, 0.0, 0.0, 0.0, 1.0]


def test_msl_off_counts_only_the_final_step():
    for epoch in range(3):
        assert msl_weights(epoch, 5, 10, enabled=False) == [0, 0, 0, 0, 1]


def test_cosine_matches_torch_scheduler_every_epoch():
    cfg = small_config("train.epochs=20", "train.meta_lr=1e-3", "train.min_meta_lr=1e-5")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20, eta_min=1e-5)
    for epoch in range(21):
        assert math.isclose(meta_lr(epoch, cfg), opt.param_groups[0]["lr"], rel_tol=1e-9)
        opt.step()
        sched.step()


def test_constant_lr_without_cosine():
    cfg = small_config("maml_pp.cosine=false")
    assert {meta_lr(e, cfg) for e in range(cfg.train.epochs + 1)} == {cfg.train.meta_lr}


def test_learner_uses_the_epochs_lr_msl_and_order():
    cfg = small_config("train.epochs=10", "maml_pp.first_order_epochs=4", "maml_pp.msl_epochs=3")
    learner = MetaLearner(cfg)
    batch = random_batch(cfg)
    for epoch in (0, 3, 4, 9):
        m = learner.train_step(batch, epoch)
        assert learner.optimizer.param_groups[0]["lr"] == meta_lr(epoch, cfg) == m.meta_lr
        assert m.second_order == second_order_at(epoch, cfg) == (epoch >= 4)
        assert m.msl_weights == msl_weights(epoch, 3, 3)
        expected = sum(w * s for w, s in zip(m.msl_weights, m.step_losses) if w > 0)
        assert math.isclose(m.loss, expected, rel_tol=1e-5)
        # no query forward the current loss does not use
        assert (m.step_losses[0] is None) == (epoch >= 3)


@pytest.mark.parametrize("cosine", [True, False])
def test_meta_update_is_adam_at_the_epochs_rate(cosine):
    """A first meta-update by hand: Adam's first step is lr * g / (|g| + eps) per element
    (bias-corrected moments g and g^2), at the cosine rate of the epoch or at meta_lr with the
    switch off."""
    cfg = small_config("train.epochs=10", "train.meta_lr=0.01", "train.min_meta_lr=0.001",
                       f"maml_pp.cosine={str(cosine).lower()}")
    learner = MetaLearner(cfg, dtype=torch.float64)
    batch = random_batch(cfg)
    epoch = 7
    before = {k: v.detach().clone() for k, v in learner.named_meta_parameters()}
    reference = MetaLearner(cfg, dtype=torch.float64)
    weights = msl_weights(epoch, cfg.train.inner_steps, cfg.maml_pp.msl_epochs)
    reference.meta_loss(batch, weights, second_order_at(epoch, cfg))
    g = {k: v.grad.clone() for k, v in reference.named_meta_parameters()}
    learner.train_step(batch, epoch)
    lr = (0.001 + (0.01 - 0.001) * (1 + math.cos(math.pi * 7 / 10)) / 2) if cosine else 0.01
    for k, v in learner.named_meta_parameters():
        expected = before[k] - lr * g[k] / (g[k].abs() + 1e-8)
        torch.testing.assert_close(v.detach(), expected, rtol=1e-9, atol=1e-12, msg=k)
