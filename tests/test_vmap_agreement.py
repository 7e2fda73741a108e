"""The vmapped meta-batch must give the plain loop's numbers, for every technique switch."""

from __future__ import annotations

import pytest
import torch

from engine.learner import MetaLearner
from engine.msl import msl_weights
from tests.helpers import flat, grads, random_batch, small_config

SWITCHES = [
    [],
    ["maml_pp.msl=false"],
    ["maml_pp.bn_per_step_stats=false"],
    ["maml_pp.bn_per_step_affine=false"],
    ["maml_pp.lslr=false"],
    ["maml_pp.bn_eval_stats=running"],
    ["train.grad_clip=0.01"],
]


def _run(cfg, impl, dtype, second, chunk=0):
    cfg.train.impl = impl
    cfg.train.chunk_size = chunk
    learner = MetaLearner(cfg, dtype=dtype)
    batch = random_batch(cfg, seed=3)
    w = msl_weights(1, cfg.train.inner_steps, cfg.maml_pp.msl_epochs, cfg.maml_pp.msl)
    result, loss = learner.meta_loss(batch, w, second)
    return learner, result, loss


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("second", [False, True])
@pytest.mark.parametrize("switch", SWITCHES, ids=lambda s: s[0] if s else "all-on")
def test_vmap_matches_loop(switch, second):
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-3)):
        cfg = small_config("train.meta_batch=4", *switch)
        loop, r_loop, loss_loop = _run(cfg, "loop", dtype, second)
        vm, r_vm, loss_vm = _run(cfg, "vmap", dtype, second, chunk=3)  # chunks of 3 and 1
        assert abs(loss_vm - loss_loop) <= tol * abs(loss_loop)
        assert _rel(r_vm.losses, r_loop.losses) <= tol
        assert _rel(r_vm.logits, r_loop.logits) <= tol
        assert _rel(flat(grads(vm)), flat(grads(loop))) <= tol
        for k, v in loop.meta.running.items():
            assert _rel(vm.meta.running[k], v) <= tol, k
        e_loop = loop.evaluate(random_batch(cfg, seed=4, tasks=5), steps=4, impl="loop")
        e_vm = vm.evaluate(random_batch(cfg, seed=4, tasks=5), steps=4, chunk=2, impl="vmap")
        assert _rel(e_vm.logits, e_loop.logits) <= tol


def test_vmap_train_steps_track_loop():
    cfg = small_config("train.meta_batch=4")
    learners = {}
    for impl in ("loop", "vmap"):
        cfg.train.impl = impl
        learners[impl] = MetaLearner(cfg, dtype=torch.float64)
        for k in range(3):
            learners[impl].train_step(random_batch(cfg, seed=k), epoch=k)
    a, b = (flat(dict(learners[i].named_meta_parameters())).detach() for i in ("vmap", "loop"))
    assert _rel(a, b) <= 1e-9
