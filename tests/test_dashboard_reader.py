"""The dashboard's data side (`RunWatcher`, `Decimator`, text helpers), without a UI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.events import EventWriter
from engine.run_store import RunDir, create_run
from mamlpp_tui.dashboard import Decimator, RunWatcher
from mamlpp_tui.dashboard.format import bar, duration, heat_rgb, sparkline
from mamlpp_tui.dashboard.reader import LOG_TAIL_BYTES, LocalMonitor
from mamlpp_tui.dashboard.widgets import loss_series

CONFIG = {"name": "tiny", "train": {"epochs": 2, "iters_per_epoch": 10, "inner_steps": 3},
          "maml_pp": {"msl": True, "msl_epochs": 1, "second_order": True,
                      "first_order_epochs": 1},
          "eval": {"ensemble_top_k": 2}}


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RunDir:
    monkeypatch.setenv("MAMLPP_HOME", str(tmp_path))
    return create_run(CONFIG)


def train(ev: EventWriter, k: int, loss: float, steps: list[float | None] | None = None,
          **extra: object) -> None:
    ev.write("train", iteration=k, epoch=(k - 1) // 10, loss=loss, accuracy=0.5,
             step_losses=steps if steps is not None else [loss + 0.2, loss + 0.1, loss],
             msl_weights=[1 / 3] * 3, meta_lr=1e-3, second_order=False, iters_per_sec=2.0,
             **extra)


def test_decimator_stays_bounded_and_spans_the_whole_series() -> None:
    d = Decimator(limit=100)
    for x in range(1, 100_001):
        d.add(x, float(x))
    points = d.snapshot()
    assert len(d) <= 100 and len(points) <= 101
    assert points[0][0] == 1 and points[-1][0] == 100_000  # first and latest kept
    gaps = {b[0] - a[0] for a, b in zip(points[:-2], points[1:-1])}
    assert len(gaps) == 1  # evenly spaced


def test_decimator_rewinds_on_replayed_iterations() -> None:
    """After a resume the engine logs iterations again; the newer copy must win."""
    d = Decimator(limit=1000)
    for x in range(1, 51):
        d.add(x, "old")
    for x in range(41, 61):
        d.add(x, "new")
    points = d.snapshot()
    assert [p[0] for p in points] == list(range(1, 61))
    assert {v for x, v in points if x > 40} == {"new"}


def test_events_are_read_incrementally_and_half_lines_wait(run: RunDir) -> None:
    watcher = RunWatcher(run.path, local_sampling=False)
    with EventWriter(run.events_path) as ev:
        for k in range(1, 4):
            train(ev, k, 1.0 / k)
    view = watcher.poll()
    assert [p[0] for p in view.loss_points] == [1, 2, 3]
    offset = watcher._offset
    with open(run.events_path, "ab") as f:  # the engine is half-way through a line
        f.write(b'{"type":"train","time":1,"iteration":4,"epoch":0,"loss":0.2')
    view = watcher.poll()
    assert len(view.loss_points) == 3 and watcher._offset == offset
    with open(run.events_path, "ab") as f:
        f.write(b',"step_losses":[0.4,0.3,null],"msl_weights":[0,0,1]}\n')
    view = watcher.poll()
    assert view.loss_points[-1][0] == 4
    assert view.loss_points[-1][1][1] == (0.4, 0.3, None)


def test_null_step_losses_are_left_out_of_the_lines() -> None:
    points = ((1, (1.0, (1.5, 1.2, 1.0), 0.5)), (2, (0.9, (None, None, 0.9), 0.6)))
    lines = loss_series(points, 3)
    assert lines == {"step 1": [(1, 1.5)], "step 2": [(1, 1.2)],
                     "step 3": [(1, 1.0), (2, 0.9)], "total": [(1, 1.0), (2, 0.9)]}


def test_replayed_events_after_resume_keep_the_last_copy(run: RunDir) -> None:
    with EventWriter(run.events_path) as ev:
        for k in range(1, 11):
            train(ev, k, 2.0)
        ev.write("val", iteration=10, epoch=0, accuracy=0.5, ci95=0.1, loss=1.0, tasks=10)
        for k in range(6, 11):  # killed at 10, resumed from a checkpoint at 5
            train(ev, k, 1.0)
        ev.write("val", iteration=10, epoch=0, accuracy=0.6, ci95=0.1, loss=1.0, tasks=10)
    view = RunWatcher(run.path, local_sampling=False).poll()
    assert [p[0] for p in view.loss_points] == list(range(1, 11))
    assert [p[1][0] for p in view.loss_points] == [2.0] * 5 + [1.0] * 5
    assert view.val[0]["accuracy"] == 0.6


def test_top_k_and_validation_history_from_sidecars(run: RunDir) -> None:
    """Validation epochs whose events are missing are filled from the newest checkpoint."""
    from engine.run_store import atomic_write_json

    history = [{"epoch": 0, "accuracy": 0.7, "ci95": 0.02, "loss": 1, "tasks": 5},
               {"epoch": 1, "accuracy": 0.8, "ci95": 0.02, "loss": 1, "tasks": 5}]
    atomic_write_json(run.checkpoints_dir / "epoch-0001.json",
                      {"iteration": 20, "epoch": 1, "val_accuracy": 0.8, "history": history})
    with EventWriter(run.events_path) as ev:
        ev.write("val", iteration=30, epoch=2, accuracy=0.75, ci95=0.02, loss=1.0, tasks=5)
    view = RunWatcher(run.path, local_sampling=False).poll()
    assert sorted(view.val) == [0, 1, 2]
    assert view.top_epochs == (1, 2)  # eval.ensemble_top_k = 2
    assert view.checkpoint_epochs == {1}


def test_log_merges_engine_log_and_notable_events(run: RunDir) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    run.log_path.write_text(
        f"{stamp},100 INFO epoch 0: validation accuracy 0.5000 +- 0.1 over 10 tasks\n"
        f"{stamp},200 INFO checkpoint epoch-0000 saved (epoch)\n"
        f"{stamp},300 WARNING checkpoint iter-5 is unusable (bad sha); falling back\n")
    with EventWriter(run.events_path) as ev:
        ev.write("checkpoint", iteration=10, epoch=0, path="checkpoints/epoch-0000.safetensors",
                 val_accuracy=0.5, reason="epoch")
        ev.write("state", iteration=10, epoch=0, state="paused", reason="requested")
        train(ev, 11, 1.0)
        ev.write("train", iteration=12, epoch=1, loss=1.0, accuracy=0.5,
                 step_losses=[None, None, 1.0], msl_weights=[0.0, 0.0, 1.0], meta_lr=1e-3,
                 second_order=True, iters_per_sec=2.0)
    lines = RunWatcher(run.path, local_sampling=False).poll().new_log
    texts = [line.text for line in lines]
    assert texts.count("checkpoint epoch-0000 saved (epoch), val 50.00%") == 1
    assert not any(t == "checkpoint epoch-0000 saved (epoch)" for t in texts)
    assert "state → paused (requested)" in texts
    assert "phase: second-order meta-gradients from epoch 1" in texts
    assert "MSL off: only the final step's loss counts from epoch 1" in texts
    assert any(line.kind == "warning" and "unusable" in line.text for line in lines)
    assert any("validation accuracy 0.5000" in t for t in texts)


def test_log_tail_starts_near_the_end_of_a_big_log(run: RunDir) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(run.log_path, "w") as f:
        for i in range(20_000):
            f.write(f"{stamp},000 INFO line {i}\n")
    watcher = RunWatcher(run.path, local_sampling=False)
    texts = [line.text for line in watcher.poll().new_log]
    assert texts[-1] == "line 19999"
    assert len(texts) < LOG_TAIL_BYTES // 20 and all(t.startswith("line ") for t in texts)
    with open(run.log_path, "a") as f:
        f.write(f"{stamp},000 INFO line 20000\n")
    assert [line.text for line in watcher.poll().new_log] == ["line 20000"]


def test_a_dead_engine_reads_as_failed_with_a_reproducible_error_line(run: RunDir) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run.write_status(state="running", pid=dead.pid)
    updated = run.read_raw_status()["updated"]
    view = RunWatcher(run.path, local_sampling=False).poll()
    assert view.state == "failed" and not view.alive
    assert f"engine process {dead.pid} is no longer running" in view.error
    errors = [line for line in view.new_log if line.kind == "error"]
    assert len(errors) == 1 and errors[0].time == updated  # the file's time, not the clock


def test_local_monitor_samples_a_live_process() -> None:
    monitor = LocalMonitor()
    assert monitor.sample(os.getpid(), "cpu") is None  # the first call primes cpu_percent
    monitor._last = 0.0
    sample = monitor.sample(os.getpid(), "cpu")
    assert sample is not None and sample["rss"] > 0 and sample["gpu_util"] is None
    assert monitor.sample(None, "cpu") is None


def test_text_helpers() -> None:
    assert bar(0.5, 4) == "██  " and bar(2.0, 3) == "███" and bar(-1, 2) == "  "
    assert sparkline([0, 1, None, 2], 10) == "▁▅ █"
    assert duration(3725) == "1:02:05" and duration(65) == "1:05" and duration(None) == "—"
    assert heat_rgb(0, 0, 1) == (68, 1, 84) and heat_rgb(1, 0, 1) == (253, 231, 37)


def test_a_live_local_engine_is_sampled_directly(run: RunDir) -> None:
    run.acquire_lock()  # this process plays the engine
    try:
        run.write_status(state="running", pid=os.getpid())
        watcher = RunWatcher(run.path)
        assert watcher.poll().system_source == "events"  # the first sample only primes
        watcher.local._last = 0.0
        view = watcher.poll()
        assert view.system_source == "live" and view.system["rss"] > 0
        assert view.system_history  # live samples feed the sparkline too
    finally:
        run.release_lock()


def test_local_monitor_reads_nvml_for_cuda_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU here: a stand-in pynvml checks the device index and the fields mapped."""
    import types

    calls: list[int] = []
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: calls.append(i) or f"gpu{i}",
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=73),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=5 * 2**30, total=80 * 2**30),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monitor = LocalMonitor()
    monitor.sample(os.getpid(), "cuda:1")
    monitor._last = 0.0
    sample = monitor.sample(os.getpid(), "cuda:1")
    assert calls == [1]
    assert sample["gpu_util"] == 73 and sample["gpu_mem_total"] == 80 * 2**30

    def broken() -> None:
        raise RuntimeError("NVML Shared Library Not Found")

    monkeypatch.setattr(fake, "nvmlInit", broken)
    monitor = LocalMonitor()
    monitor.sample(os.getpid(), "cuda")
    monitor._last = 0.0
    sample = monitor.sample(os.getpid(), "cuda")
    assert sample["gpu_util"] is None and sample["rss"] > 0  # CPU figures still come
