"""The plain definition (engine/reference.py, `train.impl = "reference"`) is the yardstick of
every fast path, and is itself checked against the independent test implementation.

- Every combination of the step's technique switches (MSL, BNRS, BNWB, LSLR, evaluation with
  running sets), first and second order: the per-task loop (plain, and on two task threads
  channels-last), the fused batch-norm/max-pool passes, tasks folded into the channels and
  vmapped tasks give the reference's
  losses, logits, meta-gradients, running sets and evaluation logits to float64 rounding.
- The reference's meta-gradient equals autograd through tests/reference_maml.py (written from
  SPEC.md without engine code) for the same switches.
- `train.impl=reference` trains a whole run and ends where the default path does.
"""

from __future__ import annotations

import itertools
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from engine.learner import MetaLearner
from engine.msl import msl_weights
from tests.helpers import grads, random_batch, small_config
from tests.reference_maml import task_objective
from tests.run_fixtures import final_tensors, mamlpp, sets

SWITCH_KEYS = ("maml_pp.msl", "maml_pp.bn_per_step_stats", "maml_pp.bn_per_step_affine",
               "maml_pp.lslr")
COMBOS = [dict(zip(SWITCH_KEYS, values))
          for values in itertools.product((True, False), repeat=len(SWITCH_KEYS))]
# the fast paths: the default CPU path's pieces taken one at a time
PATHS = {
    "loop": ["train.impl=loop", "train.task_threads=1", "train.task_group=1",
             "train.channels_last=never"],
    "loop-2-threads-channels-last": ["train.impl=loop", "train.task_threads=2",
                                     "train.task_group=1", "train.channels_last=always"],
    "loop-fused-bn-pool": ["train.impl=loop", "train.task_threads=1", "train.task_group=1"],
    # tasks folded into the channels (engine/grouped.py): parts of 2 and 1 tasks on two
    # threads, NCHW with fused passes, and all 3 tasks folded channels-last
    "folded-2-fused-bn-pool": ["train.impl=loop", "train.task_threads=2", "train.task_group=2",
                               "train.channels_last=never"],
    "folded-3-channels-last": ["train.impl=loop", "train.task_threads=1", "train.task_group=3",
                               "train.channels_last=always"],
    "vmap": ["train.impl=vmap", "train.chunk_size=2"],
}
TOL = 1e-9


def _overrides(combo: dict, eval_running: bool) -> list[str]:
    out = [f"{k}={str(v).lower()}" for k, v in combo.items()]
    stats = "running" if eval_running else "batch"
    return [*out, "train.meta_batch=3", f"maml_pp.bn_eval_stats={stats}"]


def _learner(overrides: list[str]) -> MetaLearner:
    learner = MetaLearner(small_config(*overrides), dtype=torch.float64)
    # away from the symmetric init, the same point for every path: per-step rates and BN rows
    # differ, running sets are not (0, 1)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for group in (learner.meta.lrs, learner.meta.bn):
            for v in group.values():
                v.add_(torch.rand(v.shape, generator=gen, dtype=v.dtype) * 0.05)
        for v in learner.meta.running.values():
            v.add_(torch.rand(v.shape, generator=gen, dtype=v.dtype) * 0.2)
    return learner


def _step(learner: MetaLearner, second: bool):
    cfg = learner.config
    weights = msl_weights(1, cfg.train.inner_steps, cfg.maml_pp.msl_epochs, cfg.maml_pp.msl)
    result, loss = learner.meta_loss(random_batch(cfg, seed=3), weights, second)
    evaluation = learner.evaluate(random_batch(cfg, seed=4, tasks=4), steps=4)  # 1 extra step
    return result, loss, evaluation


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _close_grads(got: dict, want: dict, where) -> None:
    """Each tensor's meta-gradient within TOL of the whole gradient's norm: conv biases feed
    batch norm, so theirs are zero up to rounding (~1e-16) and have no relative accuracy."""
    scale = torch.cat([v.reshape(-1) for v in want.values()]).norm()
    assert got.keys() == want.keys(), where
    for k, g in got.items():
        assert (g - want[k]).norm() <= TOL * scale, (where, k)


@pytest.mark.parametrize("second", [False, True], ids=["first-order", "second-order"])
@pytest.mark.parametrize("eval_running", [False, True], ids=["eval-batch", "eval-running"])
@pytest.mark.parametrize("combo", COMBOS,
                         ids=lambda c: "-".join(k.split(".")[1] for k, v in c.items() if not v)
                         or "all-on")
def test_fast_paths_equal_the_reference(combo, eval_running, second, monkeypatch):
    overrides = _overrides(combo, eval_running)
    ref = _learner([*overrides, "train.impl=reference"])
    assert ref.impl == "reference"
    r_result, r_loss, r_eval = _step(ref, second)
    r_grads = grads(ref)
    for name, path in PATHS.items():
        # fused batch norm + max-pool runs from this many elements (engine/model.py)
        monkeypatch.setattr("engine.model.FUSED_POOL_MIN", 0 if "fused" in name else 2**40)
        fast = _learner([*overrides, *path])
        result, loss, evaluation = _step(fast, second)
        where = f"{name}, {overrides}, second order {second}"
        assert abs(loss - r_loss) <= TOL * abs(r_loss), where
        assert _rel(result.losses, r_result.losses) <= TOL, where
        assert _rel(result.logits, r_result.logits) <= TOL, where
        _close_grads(grads(fast), r_grads, where)
        for k, v in fast.meta.running.items():
            assert _rel(v, ref.meta.running[k]) <= TOL, (where, k)
        assert _rel(evaluation.logits, r_eval.logits) <= TOL, where
        assert torch.equal(evaluation.accuracy, r_eval.accuracy), where


@pytest.mark.parametrize("second", [False, True], ids=["first-order", "second-order"])
@pytest.mark.parametrize("combo", [c for c in COMBOS if sum(not v for v in c.values()) <= 1],
                         ids=lambda c: "-".join(k.split(".")[1] for k, v in c.items() if not v)
                         or "all-on")
def test_reference_equals_the_independent_test_implementation(combo, second):
    """Meta-gradient of the mean task objective, autograd through tests/reference_maml.py."""
    ref = _learner([*_overrides(combo, False), "train.impl=reference"])
    cfg = ref.config
    batch = random_batch(cfg, seed=3).to("cpu", torch.float64)
    weights = msl_weights(1, cfg.train.inner_steps, cfg.maml_pp.msl_epochs, cfg.maml_pp.msl)
    _, loss = ref.meta_loss(batch, weights, second)
    named = dict(ref.named_meta_parameters())
    params = {k.split(".", 1)[1]: v for k, v in named.items() if k.startswith("net.")}
    bn = {k.split(".", 1)[1]: v for k, v in named.items() if k.startswith("bn.")}
    total = 0
    for t in range(batch.size):
        obj, _, _ = task_objective(params, bn, ref.meta.lrs, batch.x_support[t],
                                   batch.y_support[t], batch.x_query[t], batch.y_query[t],
                                   cfg.train.inner_steps, weights, second, cfg.model.stages)
        total = total + obj
    total = total / batch.size
    assert abs(loss - total.item()) <= TOL * abs(total.item())
    expected = torch.autograd.grad(total, list(named.values()))
    _close_grads(grads(ref), dict(zip(named, expected)), combo)


def test_impl_reference_trains_a_run_and_ends_where_the_default_path_does(tmp_path):
    """A whole run (3 epochs, first then second order, validation, ensemble) with
    `train.impl=reference` against the default CPU path (two task threads, lean batch norm, the
    engine's max-pool). Both float32 NCHW, one task per pass: these paths round alike, so the
    runs end 1e-5 apart. Any other float32 rounding sends a 12-step trajectory percents away
    (at some steps either path's float32 meta-gradient is 1e-3 off float64's, and Adam's first
    steps amplify small gradients' differences), so what rounds otherwise is left out here:
    torch's channels-last batch norm, whose statistics carry ~100x NCHW's float32 error
    (test_channels_last_batch_norm_precision), and folded tasks (engine/grouped.py), as precise
    as the loop but summed in another order, both checked step by step in float64
    (test_fast_paths_equal_the_reference); and the compiled batch-norm/max-pool kernels
    (engine/fused_cpu.py, float32 only), checked against float64 in tests/test_fused_cpu.py,
    and NNPACK's convolutions (engine/fft_conv.py, float32 only), in tests/test_fft_conv.py."""
    finals, logits, ensembles = {}, {}, {}
    for impl in ("reference", "auto"):
        home = tmp_path / impl
        # two task threads asked for: auto gives one per intra-op thread, and under
        # pytest-xdist the engine processes run one
        threads = "train.task_threads=2" if impl == "auto" else "train.task_threads=0"
        proc = mamlpp(home, "run", "--no-tui", *sets(f"train.impl={impl}",
                                                      "train.channels_last=never",
                                                      "train.task_group=1",
                                                      "train.fused_kernels=off",
                                                      "train.fft_conv=off", threads))
        assert proc.returncode == 0, proc.stderr
        run_id = next((home / "runs").iterdir()).name
        finals[impl] = final_tensors(home, run_id)
        saved = load_file(home / "runs" / run_id / "ensemble-logits.safetensors")
        ensembles[impl] = json.loads((home / "runs" / run_id / "ensemble.json").read_text())
        order = sorted(range(len(ensembles[impl]["members"])),
                       key=ensembles[impl]["members"].__getitem__)  # by epoch
        logits[impl] = saved["member_logits"][order].double()
        runtime = json.loads((home / "runs" / run_id / "config.json").read_text())["runtime"]
        if impl == "reference":
            assert (runtime["impl"], runtime["task_threads"]) == ("reference", 1)
        else:
            assert (runtime["impl"], runtime["task_threads"]) == ("loop", 2)
    ref, fast = finals["reference"], finals["auto"]
    assert ref.keys() == fast.keys()
    for k in ref:
        # conv biases feed batch norm: their meta-gradients, and their rates', are rounding
        # noise that Adam turns into steps of the learning rate, on any two paths alike; the
        # running means take the biases in
        noise = re.search(r"conv\d\.bias|running_mean", k)
        if k.startswith(("net.", "bn.", "lslr.", "stats.")) and not noise:
            assert _rel(fast[k].double(), ref[k].double()) <= 1e-5, k
    # what the run reports: the same validation ranking, member and ensemble test accuracies
    for key in ("members", "member_val_accuracies", "member_accuracies", "accuracy"):
        assert ensembles["auto"][key] == pytest.approx(ensembles["reference"][key], abs=1e-9)
    # test logits per member and task: adapting from parameters 1e-6 apart, a task whose
    # max-pool windows hold near-ties can pick other maxima and move by a tenth
    close = ((logits["auto"] - logits["reference"]).abs().amax(dim=(2, 3)) <= 1e-4).double()
    assert close.mean() >= 0.9, close


def test_channels_last_batch_norm_precision():
    """What the default CPU path's channels-last layout costs in float32: torch's batch norm
    statistics there are ~1e-5 off (NCHW: ~1e-7). Pinned so that a torch that fixes it, or one
    that makes it worse, is noticed."""
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(200, 32, 28, 28, generator=gen, dtype=torch.float64) + 3
    var = x64.var(dim=(0, 2, 3), unbiased=False)
    errors = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        x = x64.float().contiguous(memory_format=layout)
        _, _, invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, 0.0)
        errors[layout] = ((invstd.double() ** -2 - var) / var).abs().max().item()
    assert errors[torch.contiguous_format] < 2e-6
    assert 2e-6 < errors[torch.channels_last] < 1e-3
