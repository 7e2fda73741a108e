"""`mamlpp bench` on a tiny config: the report has every field, with sane values."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.bench import BenchOptions, run_bench, write_report
from engine.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.filters=8", "train.meta_batch=2", "train.inner_steps=2",
        "train.eval_inner_steps=2"]


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_bench_api_reports_every_measurement(tmp_path):
    options = BenchOptions(presets=["quickstart"], iters=1, eval_tasks=3, threads=1,
                           overrides=TINY, isolate=False, matmul_n=512)
    report = run_bench(options)
    assert report["schema"] == "mamlpp-bench/1"
    device = report["device"]
    assert device["device"] == "cpu" and device["torch"] and device["cpu_model"]
    assert device["cpu_logical_cores"] >= 1
    assert len(report["load_average_start"]) == 3
    assert _positive(report["matmul"]["flops_per_s"])
    assert report["reference"]["presets"]["omniglot-5w1s"]["s_per_iter"] == 0.98
    assert {(r["preset"], r["impl"]) for r in report["results"]} == {
        ("quickstart", "loop"), ("quickstart", "vmap")}
    for result in report["results"]:
        assert set(result["train"]) == {"first", "second"}
        for order, phase in result["train"].items():
            assert phase["second_order"] == (order == "second")
            assert len(phase["seconds"]) == 1 and _positive(phase["s_per_iter"])
            assert _positive(phase["cpu_s_per_iter"])
            assert phase["flops_per_iter"] > 0 and phase["flops_counted_on"] == "loop"
            assert 0 < phase["matmul_fraction"] < 1.5
            assert 0 <= phase["data_wait_fraction"] < 1
            assert phase["peak_rss_bytes"] > 10 * 2**20
            assert phase["cuda_peak_bytes"] is None
            assert abs(sum(phase["msl_weights"]) - 1) < 1e-6
        ev = result["eval"]
        assert ev["tasks"] == 3 and ev["impl"] == result["impl"]
        assert _positive(ev["tasks_per_s"]) and _positive(ev["s_per_task"])
        assert ev["peak_rss_bytes"] > 10 * 2**20
    # Second order counts more FLOPs than first; both implementations share the loop's count.
    loop, vmap = report["results"]
    assert loop["train"]["second"]["flops_per_iter"] > loop["train"]["first"]["flops_per_iter"]
    assert vmap["train"]["second"]["flops_per_iter"] == loop["train"]["second"]["flops_per_iter"]
    assert len(report["rows"]) == 4 and all("error" not in r for r in report["rows"])
    assert report["targets"]["train_impl"] == "loop"
    out = tmp_path / "r.json"
    write_report(report, out)
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(report["rows"]))


def test_bench_rejects_bad_options():
    with pytest.raises(UserError, match="Unknown preset"):
        run_bench(BenchOptions(presets=["nope"], isolate=False))
    with pytest.raises(UserError, match="impl"):
        run_bench(BenchOptions(impls=["fast"], isolate=False))
    with pytest.raises(UserError, match="model.filters"):
        run_bench(BenchOptions(overrides=["model.filters=0"], isolate=False))


@pytest.mark.slow
def test_bench_cli_prints_json():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "mamlpp_tui", "bench", "--preset", "quickstart", "--iters", "1",
         "--json", "--impl", "loop", "--order", "second", "--threads", "1", "--eval-tasks", "0",
         *[a for o in TINY for a in ("--set", o)]],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    (result,) = report["results"]
    assert result["impl"] == "loop" and set(result["train"]) == {"second"}
    assert _positive(result["train"]["second"]["s_per_iter"])
    assert result["train"]["second"]["threads"] == 1
    assert result["eval"] is None and report["rows"][0]["eval_tasks_per_s"] is None


def test_bench_cli_user_error():
    from typer.testing import CliRunner

    from mamlpp_tui.cli import app

    result = CliRunner().invoke(app, ["bench", "--order", "third"])
    assert isinstance(result.exception, UserError)
    assert "--order must be first, second or both" in str(result.exception)


def test_bench_implementation_names():
    from engine.bench import IMPLS, parse_impls

    assert parse_impls("all") == list(IMPLS) == ["auto", "plain", "loop", "vmap"]
    assert parse_impls("both") == ["loop", "vmap"]
    assert parse_impls("auto, plain,auto") == ["auto", "plain"]
    for bad in ("fast", "", "auto,"):
        with pytest.raises(UserError, match="--impl takes"):
            parse_impls(bad)
    # plain is the per-task loop with none of the speed paths
    assert IMPLS["plain"] == ["train.impl=loop", "train.task_threads=1",
                              "train.channels_last=never"]


def test_bench_pairs_auto_and_plain_in_one_process():
    report = run_bench(BenchOptions(presets=["quickstart"], impls=["auto", "plain"],
                                    orders=["second"], overrides=TINY, isolate=False,
                                    paired_rounds=2, paired_only=True, matmul_n=256))
    assert report["results"] == []  # paired_only: no per-implementation phases
    pair = report["paired"]["quickstart"]["second"]
    assert set(pair["seconds"]) == {"auto", "plain"}
    assert all(len(v) == 2 and all(_positive(x) for x in v) for v in pair["seconds"].values())
    check = report["targets"]["default_vs_plain"]["quickstart"]["second"]
    assert check["value"] == pytest.approx(pair["s_per_iter"]["plain"] / pair["s_per_iter"]["auto"])
    # one resolved path (e.g. with one torch thread, as under xdist) is one code path: met
    assert check["same_path"] == (pair["paths"]["auto"] == pair["paths"]["plain"])
    assert check["met"] == (check["same_path"]
                            or pair["s_per_iter"]["auto"] <= pair["s_per_iter"]["plain"])


def test_merge_keeps_both_reports_paired_measurements():
    """run_cpu.py --merge-into: the rerun's alternating auto-vs-plain results join the base's,
    and default_vs_plain is judged for the presets of both."""
    import copy
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_cpu", ROOT / "benchmarks" / "run_cpu.py")
    run_cpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_cpu)
    new = run_bench(BenchOptions(presets=["quickstart"], impls=["auto", "plain"],
                                 orders=["first"], overrides=TINY, isolate=False,
                                 paired_rounds=1, paired_only=True, matmul_n=256))
    base = copy.deepcopy(new)
    base["paired"] = {"omniglot-5w1s": base["paired"].pop("quickstart")}
    merged = run_cpu.merge(base, new)
    assert set(merged["paired"]) == {"omniglot-5w1s", "quickstart"}
    assert set(merged["targets"]["default_vs_plain"]) == {"omniglot-5w1s", "quickstart"}
    assert merged["paired"]["quickstart"] == new["paired"]["quickstart"]
