"""`mamlpp bench` (engine/bench.py) and the acceptance targets (benchmarks/acceptance.py).

Every number is checked against one worked out here by hand: timing maths on a fake clock,
FLOPs against a count of the network's convolutions and matmuls, memory against pages this test
touches, and the targets' verdicts on a report made up here."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import engine.bench as bench
from benchmarks.acceptance import check_targets, target_lines, versus
from engine.bench import BenchOptions, run_bench, write_report
from engine.config import resolve
from engine.data.sampler import TaskSampler
from engine.errors import UserError
from engine.learner import MetaLearner

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.filters=8", "train.meta_batch=2", "train.inner_steps=2",
        "train.eval_inner_steps=2"]
MiB, GIB = 1 << 20, 1 << 30


class FakeClock:
    """`time` for engine.bench: wall and CPU time move only when the test moves them."""

    def __init__(self, wall: list[float] | None = None) -> None:
        self.wall, self.cpu, self.script = 0.0, 0.0, list(wall or [])

    def perf_counter(self) -> float:
        return self.script.pop(0) if self.script else self.wall

    def process_time(self) -> float:
        return self.cpu

    def __getattr__(self, name):
        return getattr(time, name)


class FakeBatches:
    """The Prefetcher's interface; each batch makes the consumer wait the next of `waits`."""

    def __init__(self, clock: FakeClock, waits: list[float]) -> None:
        self.clock, self.waits, self.wait_seconds = clock, list(waits), 0.0

    def __call__(self, *args, **kwargs):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def __iter__(self):
        return self

    def __next__(self):
        wait = self.waits.pop(0)
        self.clock.wall += wait
        self.wait_seconds += wait
        return None


def test_train_phase_timing_maths_on_a_fake_clock(monkeypatch):
    """One warm-up then three timed meta-updates with known waits, wall and CPU times: the
    phase reports the timed ones only, their median, min and mean, the CPU median and the data
    wait's share (all worked out by hand)."""
    clock = FakeClock()
    waits = [0.125, 0.0, 0.25, 0.5]  # the first is the warm-up's
    walls = [0.25, 0.5, 1.0, 0.125]
    cpus = [9.0, 0.25, 0.75, 0.5]

    def update(learner, batch, weights, second_order):
        clock.wall += walls.pop(0)
        clock.cpu += cpus.pop(0)

    monkeypatch.setattr(bench, "time", clock)
    monkeypatch.setattr(bench, "_update", update)
    batches = FakeBatches(clock, waits)
    monkeypatch.setattr(bench, "Prefetcher", batches)
    cfg = resolve("quickstart", overrides=TINY)
    job = {"impl": "loop", "warmup": 1, "iters": 3, "count_flops": False}
    phase = bench._train_phase(job, cfg, bench.synthetic_dataset(cfg), torch.device("cpu"),
                               "second", matmul=1e9)
    assert walls == [] and batches.waits == []  # every update ran, each took one batch
    assert phase["seconds"] == [0.5, 1.25, 0.625]  # wait + update, the warm-up left out
    assert phase["s_per_iter"] == 0.625 and phase["s_per_iter_min"] == 0.5
    assert phase["s_per_iter_mean"] == pytest.approx(2.375 / 3)
    assert phase["cpu_s_per_iter"] == 0.5
    assert phase["data_wait_s"] == 0.75
    assert phase["data_wait_fraction"] == pytest.approx(6 / 19)  # 0.75 / 2.375
    assert phase["second_order"] is True and phase["msl_weights"] == [0.5, 0.5]  # MSL epoch 0
    assert phase["flops_per_iter"] is None and phase["matmul_fraction"] is None


def test_flop_rates_and_matmul_yardstick(monkeypatch):
    phase = {"flops_per_iter": 6e9, "s_per_iter": 2.0}
    bench._add_flop_rates(phase, 1e10)
    assert phase["flops_per_s"] == 3e9 and phase["matmul_fraction"] == pytest.approx(0.3)
    assert bench.eval_flop_rates(10**9, 0.25, 8e9) == {
        "flops_per_task": 10**9, "flops_per_s": 4e9, "matmul_fraction": 0.5}
    # three timed 64 x 64 matmuls taking 0.5, 0.25 and 1 s: the best is 2 * 64^3 / 0.25
    monkeypatch.setattr(bench, "time", FakeClock(wall=[0, 0.5, 1, 1.25, 2, 3]))
    assert bench.matmul_throughput("cpu", n=64, reps=3) == {
        "n": 64, "dtype": "float32", "reps": 3, "flops_per_s": 2_097_152.0}


def test_eval_flops_are_the_networks_convolutions_and_matmuls():
    """One validation task, counted by the bench, against a hand count: every support pass
    runs the four convs and the classifier forward and backward (weight gradients everywhere,
    input gradients except into the images), then one query forward after the last step."""
    filters, steps = 4, 2
    cfg = resolve("quickstart", overrides=[f"model.filters={filters}", "train.meta_batch=2",
                                           "train.inner_steps=2",
                                           f"train.eval_inner_steps={steps}"])
    d = cfg.data
    sampler = TaskSampler(bench.synthetic_dataset(cfg), "val", d.ways, d.shots, d.queries, 0,
                          augment=False)
    counted = bench.eval_flops_per_task(MetaLearner(cfg, "cpu"), sampler, torch.device("cpu"))

    def conv(n, c_in, side):  # 3x3, padding 1: 2 FLOPs per multiply-add
        return 2 * n * filters * side * side * c_in * 9

    def linear(n):
        return 2 * n * filters * d.ways

    stages = [(1, 28), (filters, 14), (filters, 7), (filters, 3)]
    support, query = d.ways * d.shots, d.ways * d.queries

    def forward(n):
        return sum(conv(n, c, s) for c, s in stages) + linear(n)

    backward = (conv(support, 1, 28) + sum(2 * conv(support, c, s) for c, s in stages[1:])
                + 2 * linear(support))
    assert counted == steps * (forward(support) + backward) + forward(query) == 3_972_920


def _touch(size: int) -> mmap.mmap:
    m = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        m[offset] = 1
    return m


def test_peak_memory_counts_the_phase_only():
    """300 MiB touched and released before the phase, 100 MiB inside it: the phase's peak is
    about 100 MiB above its start, so the earlier peak was reset away."""
    _touch(300 * MiB).close()
    memory = bench.PeakMemory(torch.device("cpu"))
    memory.reset()
    _touch(100 * MiB).close()
    out = memory.read()
    if out["rss_method"] != "VmHWM since phase start":
        pytest.skip("this kernel does not let a process reset its peak RSS")
    grew = out["peak_rss_bytes"] - out["rss_at_start_bytes"]
    assert 95 * MiB <= grew < 300 * MiB, grew / MiB


def test_dataset_bytes_and_training_memory_estimate():
    """The real caches' uint8 bytes (split classes x images per class x C x H x W) and the
    synthetic stand-in's; a training process peaks at its largest phase plus the data the
    stand-in did not hold."""
    assert bench.dataset_bytes(resolve("omniglot-5w1s")) == {
        "real": 1623 * 20 * 28 * 28, "synthetic": 1623 * 20 * 28 * 28}
    assert bench.dataset_bytes(resolve("miniimagenet-5w5s")) == {
        "real": 100 * 600 * 3 * 84 * 84, "synthetic": 100 * 20 * 3 * 84 * 84}
    result = {"train": {"first": {"peak_rss_bytes": 3 * GIB}, "second": {"error": "killed"}},
              "eval": {"peak_rss_bytes": 2 * GIB},
              "dataset_bytes": {"real": GIB + 10, "synthetic": 10}}
    assert bench.training_rss_estimate(result) == 4 * GIB


def _made_up_report() -> dict:
    def result(preset, impl, s_per_iter, s_per_task, train_peak, eval_peak, real, synthetic):
        return {"preset": preset, "impl": impl,
                "train": {"second": {"s_per_iter": s_per_iter, "peak_rss_bytes": train_peak}},
                "eval": {"s_per_task": s_per_task, "peak_rss_bytes": eval_peak},
                "dataset_bytes": {"real": real, "synthetic": synthetic}}

    return {
        "device": {"device": "cpu"}, "options": {"overrides": []},
        "results": [
            result("omniglot-5w1s", "auto", 0.7, 0.01, GIB, GIB, 100, 100),
            result("omniglot-5w1s", "plain", 0.8, 0.02, GIB, GIB, 100, 100),
            result("miniimagenet-5w5s", "auto", 9.0, 0.38, 2 * GIB, 3 * GIB, GIB + 7, 7),
        ],
        "paired": {
            "omniglot-5w1s": {"second": {"s_per_iter": {"auto": 1.0, "plain": 1.25},
                                         "paths": {"auto": {"p": 1}, "plain": {"p": 2}}}},
            "miniimagenet-5w5s": {
                "first": {"s_per_iter": {"auto": 1.25, "plain": 1.0},
                          "paths": {"auto": {"p": 1}, "plain": {"p": 2}}},
                "second": {"s_per_iter": {"auto": 1.25, "plain": 1.0},
                           "paths": {"auto": {"p": 1}, "plain": {"p": 1}}}}},
    }


def test_targets_judged_on_a_made_up_report():
    """Issue 6's bounds (omniglot-5w1s <= 0.75 s, miniimagenet-5w5s <= 8 s and < 4 GiB,
    validation >= 3x the reference's 0.035 / 0.76 s per task) on numbers chosen here."""
    targets = check_targets(_made_up_report())
    assert targets["train_impl"] == "auto"
    omni, mini = (targets["presets"][p] for p in ("omniglot-5w1s", "miniimagenet-5w5s"))
    assert (omni["s_per_iter"]["value"], omni["s_per_iter"]["met"]) == (0.7, True)
    assert (mini["s_per_iter"]["value"], mini["s_per_iter"]["met"]) == (9.0, False)
    assert omni["val_speedup"]["value"] == pytest.approx(3.5) and omni["val_speedup"]["met"]
    assert mini["val_speedup"]["value"] == pytest.approx(2.0)
    assert not mini["val_speedup"]["met"]
    # the larger phase (validation, 3 GiB) plus the 1 GiB of data the bench did not hold
    assert (mini["rss_gib"]["value"], mini["rss_gib"]["met"]) == (4.0, False)
    assert (omni["default_vs_plain_second"]["value"], omni["default_vs_plain_second"]["met"],
            omni["default_vs_plain_second"]["alternating"]) == (1.25, True, True)
    lines = target_lines({"targets": targets})
    assert "target omniglot-5w1s s_per_iter: 0.700 (met; bound 0.75)" in lines
    assert "target miniimagenet-5w5s rss_gib: 4.000 (missed; bound 4.0)" in lines


def test_auto_against_plain_verdicts():
    paired = _made_up_report()["paired"]
    assert versus(paired["omniglot-5w1s"]["second"]) == {
        "auto": 1.0, "plain": 1.25, "value": 1.25, "same_path": False, "met": True}
    slower = versus(paired["miniimagenet-5w5s"]["first"])
    assert (slower["value"], slower["met"]) == (0.8, False)
    # one resolved path is one code path: a gap between its two timings is the machine's
    same = versus(paired["miniimagenet-5w5s"]["second"])
    assert (same["same_path"], same["met"]) == (True, True)


@pytest.mark.slow
def test_bench_api_reports_every_measurement(tmp_path):
    options = BenchOptions(presets=["quickstart"], iters=2, eval_tasks=3, threads=1,
                           overrides=TINY, isolate=False, matmul_n=512)
    report = run_bench(options)
    assert report["schema"] == "mamlpp-bench/1" and report["device"]["device"] == "cpu"
    assert "targets" not in report  # judged by benchmarks/acceptance.py, not the engine
    assert {(r["preset"], r["impl"]) for r in report["results"]} == {
        ("quickstart", "loop"), ("quickstart", "vmap")}
    for result in report["results"]:
        assert set(result["train"]) == {"first", "second"}
        for order, phase in result["train"].items():
            assert phase["second_order"] == (order == "second")
            assert len(phase["seconds"]) == 2 and phase["threads"] == 1
            assert phase["flops_counted_on"] == "loop" and phase["cuda_peak_bytes"] is None
        ev = result["eval"]
        assert ev["tasks"] == 3 and ev["impl"] == result["impl"] and ev["batch"] == 50
    # second order counts more FLOPs than first; vmap is given the loop's count
    loop, vmap = report["results"]
    assert loop["train"]["second"]["flops_per_iter"] > loop["train"]["first"]["flops_per_iter"]
    assert vmap["train"]["second"]["flops_per_iter"] == loop["train"]["second"]["flops_per_iter"]
    assert len(report["rows"]) == 4 and all("error" not in r for r in report["rows"])
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
    assert len(result["train"]["second"]["seconds"]) == 1
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
    assert IMPLS["plain"] == ["train.impl=loop", "train.task_threads=1", "train.task_group=1",
                              "train.channels_last=never", "train.fused_kernels=off",
                              "train.fft_conv=off"]


def test_bench_pairs_auto_and_plain_in_one_process():
    report = run_bench(BenchOptions(presets=["quickstart"], impls=["auto", "plain"],
                                    orders=["second"], overrides=TINY, isolate=False,
                                    paired_rounds=2, paired_only=True, matmul_n=256))
    assert report["results"] == []  # paired_only: no per-implementation phases
    pair = report["paired"]["quickstart"]["second"]
    assert {k: len(v) for k, v in pair["seconds"].items()} == {"auto": 2, "plain": 2}
    # plain is what its overrides say whatever the machine; auto is the engine's resolution
    assert pair["paths"]["plain"] == {"impl": "loop", "precision": "float32", "task_threads": 1,
                                      "task_group": 1, "channels_last": [False, False]}


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
