"""`mamlpp bench --whole-run`: the schedule's phases and the estimate, against a count by hand
of the paper's schedule (SPEC 2.1, 2.2, 5)."""

from __future__ import annotations

import json
import math

import pytest

from engine.config import resolve
from engine.whole_run import estimate, reference_schedule, schedule
from tests.run_fixtures import mamlpp

FO, FM, SO, SM = (False, False), (False, True), (True, False), (True, True)


@pytest.mark.parametrize("preset, msl_epochs", [("omniglot-5w1s", 10),
                                                ("miniimagenet-5w5s", 15)])
def test_paper_schedule_by_hand(preset, msl_epochs):
    cfg = resolve(preset)
    # 100 epochs: first order with MSL, first order last step, then second order last step
    assert schedule(cfg) == {FM: msl_epochs, FO: 50 - msl_epochs, SO: 50}
    # the reference code: second order from the start, MSL the same
    assert schedule(reference_schedule(cfg)) == {SM: msl_epochs, SO: 100 - msl_epochs}
    assert cfg.maml_pp.first_order_epochs == 50  # the config itself is untouched
    s = {FM: 0.5, FO: 0.25, SO: 1.0, SM: 2.0}
    got = estimate(cfg, s, 0.01)
    train = 500 * (msl_epochs * 0.5 + (50 - msl_epochs) * 0.25 + 50 * 1.0)
    assert math.isclose(got["training_s"], train)
    assert math.isclose(got["validation_s"], 100 * 600 * 0.01)
    assert math.isclose(got["ensemble_s"], 3 * 600 * 0.01)
    assert math.isclose(got["total_hours"], (train + 600 + 18) / 3600)
    ref = estimate(reference_schedule(cfg), s, 0.01)
    assert math.isclose(ref["training_s"], 500 * (msl_epochs * 2.0 + (100 - msl_epochs) * 1.0))


def test_whole_run_through_the_cli(tmp_path):
    args = ["bench", "--whole-run", "--preset", "quickstart", "--iters", "1",
            "--eval-tasks", "2", "--json", "--set", "model.filters=8"]
    proc = mamlpp(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    run = json.loads(proc.stdout)["runs"][0]
    cfg = resolve("quickstart", overrides=["model.filters=8"])
    phases = {(p["second_order"], p["every_step_loss"]): p["s_per_iter"] for p in run["phases"]}
    assert set(phases) == set(schedule(cfg)) | set(schedule(reference_schedule(cfg)))
    want = estimate(cfg, phases, run["validation"]["s_per_task"])
    assert run["schedule"]["epochs_per_phase"] == want.pop("epochs_per_phase")
    assert {k: run["schedule"][k] for k in want} == pytest.approx(want)
    assert run["reference_schedule"]["total_s"] > 0
