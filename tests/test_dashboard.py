"""The live dashboard, driven headless (Textual's `run_test` pilot) against real run directories.

The run directory comes from one place, `make_run_dir`: a finished quickstart-shaped run written
with the engine's own `create_run` and `EventWriter`. Every check reads the numbers it expects
from that directory (`expected`), not from constants here, so the fixture can be swapped for a
real quickstart run without touching the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine.config import resolve
from engine.events import EventWriter, read_events
from engine.msl import msl_weights
from engine.run_store import RunDir, atomic_write_json, create_run
from mamlpp_tui.dashboard import ConfirmScreen, DashboardApp, run_dashboard
from mamlpp_tui.dashboard.widgets import LossPanel

REPO = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000.0  # event times are fixed so views (and snapshots) are reproducible
BIG = (150, 50)  # every panel fully visible


# ---------------------------------------------------------------- the run directory fixture


def _log_stamp(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f",{int(t * 1000) % 1000:03d}"


def make_run_dir(tmp_path: Path) -> Path:
    """A finished run: 4 epochs x 25 iterations, MSL and first order for 2 epochs, per-epoch
    validation, top-3 checkpoints, an ensemble; written as the engine writes it."""
    cfg = resolve("quickstart", overrides=[
        "train.epochs=4", "train.iters_per_epoch=25", "maml_pp.msl_epochs=2",
        "maml_pp.first_order_epochs=2", "eval.val_tasks=50", "eval.test_tasks=60"]).to_dict()
    cfg["runtime"] = {"device": "cpu", "impl": "loop", "dtype": "float32", "world_size": 1}
    run = create_run(cfg, name="sample")
    t = cfg["train"]
    epochs, ipe, steps = t["epochs"], t["iters_per_epoch"], t["inner_steps"]
    msl_epochs = cfg["maml_pp"]["msl_epochs"]
    foe = cfg["maml_pp"]["first_order_epochs"]
    val_acc = [0.6213, 0.7087, 0.7452, 0.7301]
    val_ci = [0.0311, 0.0287, 0.0264, 0.0270]
    names = [f"conv{i}.{p}" for i in range(4) for p in ("weight", "bias")]
    names += ["linear.weight", "linear.bias"]
    clock = [T0]
    log_lines: list[str] = []

    def at() -> float:
        clock[0] += 0.25
        return clock[0]

    def log(msg: str) -> None:
        log_lines.append(f"{_log_stamp(clock[0])} INFO {msg}")

    with EventWriter(run.events_path) as ev:
        ev.write("state", iteration=0, epoch=0, time=at(), state="running", reason="started")
        ev.write("lslr", iteration=0, epoch=0, time=at(),
                 rates={n: [t["inner_lr"]] * steps for n in names})
        history = []
        for k in range(1, epochs * ipe + 1):
            epoch = (k - 1) // ipe
            weights = msl_weights(epoch, steps, msl_epochs)
            base = 1.6 * math.exp(-k / 60) + 0.05 * math.sin(k)
            losses: list[float | None] = [base * (1.0 - 0.22 * i) for i in range(steps)]
            if epoch >= msl_epochs:
                losses = [None] * (steps - 1) + [losses[-1]]
            total = sum(w * v for w, v in zip(weights, losses) if v is not None)
            ev.write("train", iteration=k, epoch=epoch, time=at(), loss=total,
                     accuracy=min(1.0, 0.4 + k / 200), step_losses=losses, msl_weights=weights,
                     meta_lr=0.002, second_order=epoch >= foe, iters_per_sec=4.0 + k / 100)
            if k % 10 == 1:
                ev.write("system", iteration=k, epoch=epoch, time=at(), device="cpu",
                         gpu_util=None, gpu_mem_used=None, gpu_mem_total=None,
                         cpu_percent=150.0 + k % 7, rss=512 * 1024**2 + k * 1024**2)
            if k % ipe == 0:
                entry = {"epoch": epoch, "accuracy": val_acc[epoch], "ci95": val_ci[epoch],
                         "loss": 0.9 - 0.1 * epoch, "tasks": cfg["eval"]["val_tasks"]}
                history.append(entry)
                ev.write("val", iteration=k, epoch=epoch, time=at(),
                         **{x: entry[x] for x in ("accuracy", "ci95", "loss", "tasks")})
                log(f"epoch {epoch}: validation accuracy {val_acc[epoch]:.4f} +- "
                    f"{val_ci[epoch]:.4f} over {entry['tasks']} tasks")
                name = f"epoch-{epoch:04d}"
                atomic_write_json(run.checkpoints_dir / f"{name}.json", {
                    "iteration": k, "epoch": epoch, "val_accuracy": val_acc[epoch],
                    "history": list(history), "reason": "epoch", "file": f"{name}.safetensors"})
                (run.checkpoints_dir / f"{name}.safetensors").write_bytes(b"")
                atomic_write_json(run.checkpoints_dir / "latest.json",
                                  {"name": name, "file": f"{name}.safetensors"})
                ev.write("checkpoint", iteration=k, epoch=epoch, time=at(),
                         path=f"checkpoints/{name}.safetensors", val_accuracy=val_acc[epoch],
                         reason="epoch")
                log(f"checkpoint {name} saved (epoch)")
                rates = {n: [round(0.1 + 0.004 * (j + 1) * (epoch + 1) * (1 if i % 2 else -1)
                                   + 0.002 * i, 6) for j in range(steps)]
                         for i, n in enumerate(names)}
                ev.write("lslr", iteration=k, epoch=epoch, time=at(), rates=rates)
                if epoch + 1 == foe:
                    log(f"epoch {epoch + 1}: second-order meta-gradients from here on")
        # retention: the newest checkpoint and the top-3 by validation accuracy
        top = sorted(range(epochs), key=lambda e: (-val_acc[e], e))[:3]
        for e in range(epochs):
            if e not in top and e != epochs - 1:
                (run.checkpoints_dir / f"epoch-{e:04d}.json").unlink()
                (run.checkpoints_dir / f"epoch-{e:04d}.safetensors").unlink()
        result = {"members": top, "member_accuracies": [0.7412, 0.7288, 0.7035],
                  "member_ci95": [0.021, 0.022, 0.023], "accuracy": 0.7633, "ci95": 0.0205,
                  "tasks": cfg["eval"]["test_tasks"],
                  "member_val_accuracies": [val_acc[e] for e in top]}
        ev.write("ensemble", iteration=epochs * ipe, epoch=epochs - 1, time=at(), **result)
        log(f"ensemble of epochs {top}: test accuracy 0.7633 +- 0.0205")
        run.write_ensemble(result)
        ev.write("state", iteration=epochs * ipe, epoch=epochs - 1, time=at(),
                 state="finished", reason="all epochs done")
    run.log_path.write_text("\n".join(log_lines) + "\n")
    run.write_status(state="finished", pid=None, iteration=epochs * ipe, epoch=epochs - 1,
                     error=None)
    return run.path


def crash(run_dir: Path) -> str:
    """Turn a finished run into one whose engine died 80% of the way through: the events stop
    there, status.json still says running with a pid that is gone (and no lock), engine.log
    ends in a traceback. Returns the error `read_status` reports."""
    run = RunDir(run_dir)
    events, _ = read_events(run.events_path)
    cfg = run.read_config()
    stop = cfg["train"]["epochs"] * cfg["train"]["iters_per_epoch"] * 4 // 5
    kept = [e for e in events if e["iteration"] <= stop and e["type"] != "ensemble"
            and e.get("state") != "finished"]
    run.events_path.write_text("".join(json.dumps(e) + "\n" for e in kept))
    run.ensemble_path.unlink(missing_ok=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run.write_status(state="running", pid=dead.pid, iteration=stop,
                     epoch=stop // cfg["train"]["iters_per_epoch"], error=None)
    # a dead engine logs nothing after its crash: drop engine.log's later lines
    crashed_at = _log_stamp(kept[-1]["time"] + 1)
    with contextlib.suppress(FileNotFoundError):
        lines = run.log_path.read_text().splitlines(keepends=True)
        run.log_path.write_text("".join(ln for ln in lines if not re.match(r"\d{4}-", ln)
                                        or ln[:23] <= crashed_at))
    with open(run.log_path, "a") as f:
        f.write(f"{crashed_at} ERROR engine crashed:\n"
                "Traceback (most recent call last):\n"
                '  File "engine/trainer.py", line 140, in _train\n'
                "RuntimeError: CUDA error: an illegal memory access was encountered\n")
    return run.read_status()["error"]


def expected(run_dir: Path) -> dict[str, Any]:
    """What the dashboard must show, read straight from the run directory."""
    events, _ = read_events(run_dir / "events.jsonl")
    by_type: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_type.setdefault(e["type"], []).append(e)
    cfg = json.loads((run_dir / "config.json").read_text())
    val = {e["epoch"]: e for e in by_type.get("val", [])}
    top_k = cfg["eval"]["ensemble_top_k"]
    top = [e for e, _ in sorted(val.items(), key=lambda kv: (-kv[1]["accuracy"], kv[0]))][:top_k]
    ens_path = run_dir / "ensemble.json"
    return {
        "config": cfg, "status": RunDir(run_dir).read_status(), "train": by_type["train"],
        "last_train": by_type["train"][-1], "lslr": by_type["lslr"][-1], "val": val,
        "top": top, "system": by_type.get("system", [None])[-1],
        "ensemble": json.loads(ens_path.read_text()) if ens_path.exists() else None,
        "total": cfg["train"]["epochs"] * cfg["train"]["iters_per_epoch"],
        "msl": {e["epoch"]: e["msl_weights"] for e in by_type["train"]},
    }


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MAMLPP_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real finished quickstart run (tiny budget) made by the engine itself."""
    from engine.config import resolve
    from engine.run_store import create_run
    from engine.trainer import Trainer
    from tests.run_fixtures import TINY

    home = tmp_path_factory.mktemp("real-home")
    old = os.environ.get("MAMLPP_HOME")
    os.environ["MAMLPP_HOME"] = str(home)
    try:
        config = resolve("quickstart", overrides=[*TINY, "train.epochs=4"])
        run = create_run(config.to_dict())
        assert Trainer(run, "cpu").train() == "finished"
    finally:
        if old is None:
            del os.environ["MAMLPP_HOME"]
        else:
            os.environ["MAMLPP_HOME"] = old
    return run.path


@pytest.fixture
def run_dir(request: pytest.FixtureRequest, home: Path, tmp_path: Path) -> Path:
    """The synthetic run of `make_run_dir`, or (parametrized "real") a copy of a real run."""
    if getattr(request, "param", "synthetic") == "real":
        real = request.getfixturevalue("real_run")
        target = home / "runs" / real.name
        shutil.copytree(real, target)
        return target
    return make_run_dir(tmp_path)


both_runs = pytest.mark.parametrize("run_dir", ["synthetic", "real"], indirect=True)


# ---------------------------------------------------------------- helpers


def run_app(app: DashboardApp, body: Callable[..., Any], size: tuple[int, int] = BIG,
            notifications: bool = False) -> None:
    """Run `body(app, pilot)` against the app headless (no pytest-asyncio needed)."""

    async def main() -> None:
        async with app.run_test(size=size, notifications=notifications) as pilot:
            await body(app, pilot)

    asyncio.run(main())


async def wait_for(pilot: Any, condition: Callable[[], Any], timeout: float = 30.0) -> None:
    """Poll until `condition` holds. The timeout only stops a hang: a busy 2-core machine can
    stall the app for seconds, so speed bounds live in `slow` tests (limit= below)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await pilot.pause(0.05)


async def loaded(app: DashboardApp, pilot: Any) -> None:
    """Wait until the first poll has been drawn."""
    await wait_for(pilot, lambda: app.view is not None and len(app.query("FooterKey")) > 0)
    await pilot.pause(0.1)


def panel_text(app: DashboardApp, selector: str) -> str:
    """The text a panel shows on screen right now (borders and titles included)."""
    widget = app.query_one(selector)
    strips = app.screen._compositor.render_strips()
    r = widget.region
    return "\n".join(strips[y].crop(r.x, r.right).text for y in range(r.y, r.bottom))


def log_text(app: DashboardApp) -> str:
    """Every line the log panel has rendered, including those scrolled out of view."""
    return "\n".join(strip.text for strip in app.query_one("#log").lines)


def svg_text(svg: str) -> str:
    """The visible text of a Textual SVG screenshot, one screen row per line, each piece at
    its column (the SVG leaves blank cells out and writes spaces as &#160;)."""
    cell = 12.2  # the width of one terminal cell in Textual's SVG export
    rows: dict[float, list[tuple[int, str]]] = {}
    for m in re.finditer(r'<text class="[^"]*-r\d+" x="([\d.]+)" y="([\d.]+)" '
                         r'[^>]*>(.*?)</text>', svg, re.S):
        text = html.unescape(m.group(3)).replace("\xa0", " ").rstrip("\n")
        rows.setdefault(float(m.group(2)), []).append((round(float(m.group(1)) / cell), text))
    lines = []
    for _, pieces in sorted(rows.items()):
        line = ""
        for col, text in sorted(pieces):
            line = line.ljust(col) + text
        lines.append(line)
    return "\n".join(lines)


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


# ---------------------------------------------------------------- every panel, finished run


@both_runs
def test_every_panel_shows_the_runs_numbers(run_dir: Path) -> None:
    exp = expected(run_dir)

    async def body(app: DashboardApp, pilot: Any) -> None:
        await loaded(app, pilot)
        header = panel_text(app, "#header")
        assert run_dir.name in header
        assert exp["config"]["name"] in header
        assert exp["status"]["state"] == "finished" and "● finished" in header
        assert f"device {exp['config']['runtime']['device']}" in header
        last = exp["last_train"]
        assert ("second-order" if last["second_order"] else "first-order") in header
        assert f"iter {exp['total']}/{exp['total']}" in header
        speed = last["iters_per_sec"]
        assert (f"{speed:.2f} it/s" if speed else "— it/s") in header
        assert "100%" in header

        losses = panel_text(app, "#losses")
        steps = last["step_losses"]
        for i, v in enumerate(steps):
            assert f"step {i + 1} " + ("—" if v is None else f"{v:.3f}") in losses
        assert f"total {last['loss']:.3f}" in losses
        assert any("⠁" <= ch <= "⣿" for ch in losses), "the chart draws braille lines"
        series = app.query_one(LossPanel).series()
        for i in range(len(steps)):
            want = [(e["iteration"], e["step_losses"][i]) for e in exp["train"]
                    if e["step_losses"][i] is not None]
            assert series[f"step {i + 1}"] == want  # nulls (MSL off) are left out
        assert series["total"] == [(e["iteration"], e["loss"]) for e in exp["train"]]

        msl = panel_text(app, "#msl")
        for i, w in enumerate(last["msl_weights"]):
            assert re.search(rf"step {i + 1} .*{w:.3f}", msl)
        for epoch, weights in exp["msl"].items():
            assert f"e{epoch} {weights[-1]:.3f}" in msl

        lslr = panel_text(app, "#lslr")
        assert f"epoch {exp['lslr']['epoch']}" in lslr
        for name, rates in exp["lslr"]["rates"].items():
            row = next(line for line in lslr.splitlines() if f" {name} " in line)
            shown = [float(x) for x in re.findall(r"-?\d+\.\d+(?:e[-+]\d+)?", row)]
            assert shown == pytest.approx(rates, rel=1e-2, abs=6e-5)

        val = panel_text(app, "#val")
        rows = {int(m.group(1)): m.group(0) for m in re.finditer(r"^│\s+(\d+)\s+.*$", val, re.M)}
        assert sorted(rows) == sorted(exp["val"])
        for epoch, e in exp["val"].items():
            assert pct(e["accuracy"]) in rows[epoch]
            assert f"±{100 * e['ci95']:.2f}" in rows[epoch]
            assert ("★ top" in rows[epoch]) == (epoch in exp["top"])
        ens = exp["ensemble"]
        assert f"epochs {', '.join(map(str, ens['members']))} → {pct(ens['accuracy'])}" in val
        assert f"±{100 * ens['ci95']:.2f} on {ens['tasks']} test tasks" in val

        system = panel_text(app, "#system")
        sample = exp["system"]
        assert "CPU (no GPU)" in system
        assert re.search(rf"CPU +{sample['cpu_percent']:.1f}% ", system)
        assert f"{sample['rss'] / 1024**2:.0f} MiB" in system

        log = log_text(app)
        assert "state → finished (all epochs done)" in panel_text(app, "#log")  # the newest
        assert "phase: second-order meta-gradients" in log
        assert "MSL off" in log
        assert "ensemble of epochs" in log
        for epoch in exp["val"]:  # one line per checkpoint: engine.log's copy is dropped
            assert log.count(f"checkpoint epoch-{epoch:04d} saved") == 1

    run_app(DashboardApp(run_dir, local_sampling=False), body)


@both_runs
def test_snapshot_finished_run_is_deterministic(run_dir: Path, tmp_path: Path) -> None:
    exp = expected(run_dir)

    async def body(app: DashboardApp, pilot: Any) -> None:
        await loaded(app, pilot)
        path = Path(app.save_screenshot("finished.svg", str(tmp_path)))
        first = path.read_text()
        await pilot.pause(1.2)  # two more polls: nothing may change on a finished run
        assert app.export_screenshot() == first
        text = svg_text(first)
        for needle in (run_dir.name, "● finished", "done", f"iter {exp['total']}/{exp['total']}",
                       "Query loss per inner step", "MSL weights", "Validation accuracy",
                       "Learned inner LRs", "CPU (no GPU)", "state → finished",
                       pct(exp["ensemble"]["accuracy"]), "p Pause/unpause", "q Close"):
            assert needle in text, needle
        for e in exp["val"].values():
            assert pct(e["accuracy"]) in text

    run_app(DashboardApp(run_dir, local_sampling=False), body, size=(120, 40))


@both_runs
def test_snapshot_crashed_run(run_dir: Path, tmp_path: Path) -> None:
    error = crash(run_dir)

    async def body(app: DashboardApp, pilot: Any) -> None:
        await loaded(app, pilot)
        text = svg_text(Path(app.save_screenshot("crashed.svg", str(tmp_path))).read_text())
        exp = expected(run_dir)
        assert "● failed" in text
        assert f"iter {exp['status']['iteration']}/{exp['total']}" in text
        assert f"error: {error}" in text  # header, and once more in the log
        assert "RuntimeError: CUDA error: an illegal memory access" in text
        assert "not run yet (press e)" in text  # its ensemble.json was removed
        assert "ETA" not in text
        await pilot.press("p")  # nothing to pause: no command may be queued for a dead engine
        await wait_for(pilot, lambda: len(app.query("Toast")) > 0)
        toast = svg_text(app.export_screenshot())
        assert "no engine to pause" in toast and "mamlpp resume" in toast
        assert not (run_dir / "control.json").exists()

    run_app(DashboardApp(run_dir, local_sampling=False), body, size=(120, 40),
            notifications=True)


def test_gpu_run_shows_utilisation_and_memory(run_dir: Path) -> None:
    with EventWriter(run_dir / "events.jsonl") as ev:
        ev.write("system", iteration=100, epoch=3, time=T0 + 5000, device="cuda:0",
                 gpu_util=87, gpu_mem_used=12 * 1024**3, gpu_mem_total=80 * 1024**3,
                 cpu_percent=101.0, rss=3 * 1024**3)

    async def body(app: DashboardApp, pilot: Any) -> None:
        await loaded(app, pilot)
        system = panel_text(app, "#system")
        assert "GPU" in system and "no GPU" not in system
        assert re.search(r"GPU util +87\.0% ", system)
        assert re.search(r"GPU mem +12\.0/80\.0 GiB ", system)
        assert "CPU 101%" in system

    run_app(DashboardApp(run_dir, local_sampling=False), body)


def test_live_run_updates_incrementally(run_dir: Path) -> None:
    """Events appended while the dashboard is open show up on the next polls."""

    exp = expected(run_dir)
    epoch = max(exp["val"]) + 1
    iteration = exp["last_train"]["iteration"] + 1
    perfect = [e for e, v in exp["val"].items() if v["accuracy"] >= 1.0]

    async def body(app: DashboardApp, pilot: Any) -> None:
        await loaded(app, pilot)
        offset = app.watcher._offset
        with EventWriter(run_dir / "events.jsonl") as ev:
            ev.write("train", iteration=iteration, epoch=epoch, time=T0 + 6000, loss=0.111,
                     accuracy=0.9, step_losses=[None, None, 0.111], msl_weights=[0, 0, 1],
                     meta_lr=0.001, second_order=True, iters_per_sec=9.5)
            ev.write("val", iteration=iteration, epoch=epoch, time=T0 + 6001, accuracy=1.0,
                     ci95=0.0123, loss=0.5, tasks=50)
        await wait_for(pilot, lambda: "±1.23" in panel_text(app, "#val"))
        row = next(line for line in panel_text(app, "#val").splitlines() if "±1.23" in line)
        assert re.match(rf"│\s+{epoch}\s+100\.00%", row)
        if len(perfect) < exp["config"]["eval"]["ensemble_top_k"]:
            assert "★ top" in row
        assert "total 0.111" in panel_text(app, "#losses")
        assert app.view.loss_points[-1][0] == iteration
        assert app.watcher._offset > offset

    run_app(DashboardApp(run_dir, poll_s=0.2, local_sampling=False), body)


@both_runs
def test_narrow_terminal_stacks_panels_without_overlap(run_dir: Path) -> None:
    async def body(app: DashboardApp, pilot: Any) -> None:
        await loaded(app, pilot)
        assert "-narrow" in app.screen.classes
        regions = [app.query_one(s).region for s in
                   ("#losses", "#msl", "#val", "#lslr", "#system", "#log")]
        body = app.query_one("#body")
        assert body.virtual_size.width <= body.region.width  # nothing sticks out sideways
        for r in regions:
            assert r.x >= 0 and r.right <= body.region.right
        for a, b in zip(regions, regions[1:]):
            assert a.bottom <= b.y  # stacked, never overlapping
        header = panel_text(app, "#header")
        assert "finished" in header and "iter" in header
        assert "q Close" in svg_text(app.export_screenshot())

    run_app(DashboardApp(run_dir, local_sampling=False), body, size=(80, 24))


def _big_run() -> RunDir:
    cfg = resolve("quickstart", overrides=["train.epochs=100", "train.iters_per_epoch=1000"])
    run = create_run(cfg.to_dict(), name="big")
    lines = []
    for k in range(1, 100_001):
        lines.append(json.dumps({
            "type": "train", "time": T0 + k, "iteration": k, "epoch": (k - 1) // 1000,
            "loss": 1 / k, "accuracy": 0.5, "step_losses": [2 / k, 1.5 / k, 1 / k],
            "msl_weights": [0.0, 0.0, 1.0], "meta_lr": 1e-3, "second_order": True,
            "iters_per_sec": 30.0}))
    run.events_path.write_text("\n".join(lines) + "\n")
    run.write_status(state="stopped", iteration=100_000, epoch=99)
    return run


def test_big_run_reads_events_once_and_stays_bounded(home: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """100k events: the first poll reads them once, the charts stay bounded, and a later poll
    with nothing new reads no event at all (it starts at the end of the file)."""
    import mamlpp_tui.dashboard.reader as reader

    run = _big_run()
    reads: list[tuple[int, int]] = []  # (offset asked for, events returned)

    def counting(path: Path, offset: int = 0) -> Any:
        events, end = read_events(path, offset)
        reads.append((offset, len(events)))
        return events, end

    monkeypatch.setattr(reader, "read_events", counting)

    async def body(app: DashboardApp, pilot: Any) -> None:
        await wait_for(pilot, lambda: app.view is not None, timeout=120)
        assert len(app.view.loss_points) <= 2001
        assert app.view.loss_points[-1][0] == 100_000
        assert "iter 100000/100000" in panel_text(app, "#header")
        app.watcher.poll()
        size = run.events_path.stat().st_size
        assert reads[0] == (0, 100_000)  # every event read once, by the first poll
        assert len(reads) > 1 and set(reads[1:]) == {(size, 0)}  # later: from the end, nothing

    run_app(DashboardApp(run.path, local_sampling=False), body)


@pytest.mark.slow  # wall-clock bounds: on a loaded machine they measure the load
def test_big_run_opens_quickly(home: Path) -> None:
    run = _big_run()

    async def body(app: DashboardApp, pilot: Any) -> None:
        started = time.monotonic()
        await wait_for(pilot, lambda: app.view is not None, timeout=20)
        assert time.monotonic() - started < 15
        t = time.monotonic()
        app.watcher.poll()  # nothing new: it only stats the files
        assert time.monotonic() - t < 0.5

    run_app(DashboardApp(run.path, local_sampling=False), body)


# ---------------------------------------------------------------- steering a live engine

FAKE_ENGINE = r"""
import os, sys, time
from pathlib import Path
from engine.control import ControlReader
from engine.events import EventWriter
from engine.run_store import RunDir

run = RunDir(Path(sys.argv[1]))
run.acquire_lock()
reader = ControlReader(run.path)
events = EventWriter(run.events_path)
it = 100

def set_state(state, reason):
    run.write_status(state=state, pid=os.getpid(), iteration=it, epoch=3, error=None)
    events.write("state", iteration=it, epoch=3, state=state, reason=reason)

set_state("running", "resumed")
paused = False
while True:
    for command in reader.poll():
        if command == "pause" and not paused:
            paused = True
            set_state("paused", "requested")
        elif command == "unpause" and paused:
            paused = False
            set_state("running", "unpaused")
        elif command == "checkpoint":
            events.write("checkpoint", iteration=it, epoch=3, path="checkpoints/iter-1.safetensors",
                         val_accuracy=None, reason="requested")
        elif command == "stop":
            set_state("stopped", "requested")
            sys.exit(0)
    time.sleep(0.05)
"""


@pytest.fixture
def engine(run_dir: Path, tmp_path: Path) -> Any:
    """A stand-in engine process on the run: holds the lock, obeys control.json like
    Trainer._handle_control, writes status and state events."""
    script = tmp_path / "fake_engine.py"
    script.write_text(FAKE_ENGINE)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir)], env=env, cwd=REPO)
    run = RunDir(run_dir)
    deadline = time.monotonic() + 60
    while not (run.is_locked() and run.read_raw_status().get("pid") == proc.pid):
        assert proc.poll() is None and time.monotonic() < deadline, "fake engine did not start"
        time.sleep(0.02)
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@both_runs
@pytest.mark.parametrize("limit", [None, pytest.param(4.0, marks=pytest.mark.slow)],
                         ids=["behaviour", "within-4s"])
def test_p_pauses_and_unpauses_and_q_leaves_the_engine_running(run_dir: Path, engine: Any,
                                                               limit: float | None) -> None:
    """`limit`: seconds the pause and unpause may take together (a speed bound, slow only)."""
    run = RunDir(run_dir)

    async def body(app: DashboardApp, pilot: Any) -> None:
        await wait_for(pilot, lambda: app.view is not None and app.view.state == "running")
        assert "● running" in panel_text(app, "#header")
        t = time.monotonic()
        await pilot.press("p")
        await wait_for(pilot, lambda: "● paused" in panel_text(app, "#header"), limit or 30)
        assert run.read_status()["state"] == "paused"
        await pilot.press("p")
        await wait_for(pilot, lambda: "● running" in panel_text(app, "#header"), limit or 30)
        if limit:
            assert time.monotonic() - t < limit
        assert run.read_status()["state"] == "running"
        assert "state → paused (requested)" in panel_text(app, "#log")
        await pilot.press("q")
        await pilot.pause(0.1)

    app = DashboardApp(run_dir, local_sampling=False)
    run_app(app, body)
    assert app.return_code == 0
    time.sleep(0.3)
    assert engine.poll() is None, "closing the dashboard must leave the run going"
    assert run.read_status()["state"] == "running"


def test_c_checkpoints_and_s_stops_after_confirmation(run_dir: Path, engine: Any) -> None:
    run = RunDir(run_dir)

    def commands() -> list[str]:
        path = run_dir / "control.json"
        if not path.exists():
            return []
        return [c["command"] for c in json.loads(path.read_text())["commands"]]

    async def body(app: DashboardApp, pilot: Any) -> None:
        await wait_for(pilot, lambda: app.view is not None and app.view.state == "running")
        await pilot.press("c")
        await wait_for(pilot, lambda: commands() == ["checkpoint"])
        await wait_for(pilot, lambda: "checkpoint iter-1 saved (requested)"
                       in panel_text(app, "#log"))
        await pilot.press("s")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("n")  # changed my mind: nothing is sent
        await pilot.pause(0.3)
        assert not isinstance(app.screen, ConfirmScreen)
        assert commands() == ["checkpoint"] and engine.poll() is None
        await pilot.press("s")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await wait_for(pilot, lambda: "● stopped" in panel_text(app, "#header"))
        assert commands() == ["checkpoint", "stop"]

    run_app(DashboardApp(run_dir, local_sampling=False), body)
    assert engine.wait(60) == 0
    assert run.read_status()["state"] == "stopped"


FAKE_ENSEMBLE = r"""
import json, os, sys, time
from pathlib import Path
from engine.run_store import RunDir, runs_root
run = RunDir(runs_root() / sys.argv[-1])
print("evaluating", sys.argv[-1], "session", os.getsid(0), flush=True)
time.sleep(0.6)
run.write_ensemble({"members": [2, 3], "member_accuracies": [0.75, 0.74],
                    "member_ci95": [0.02, 0.02], "accuracy": 0.7777, "ci95": 0.0199,
                    "tasks": 123})
"""


def test_e_runs_the_ensemble_detached_and_shows_the_result(run_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    app = DashboardApp(run_dir, poll_s=0.2, local_sampling=False)
    assert app.ensemble_command() == [sys.executable, "-m", "mamlpp_tui", "ensemble",
                                      run_dir.name, "--plain"]
    script = tmp_path / "fake_ensemble.py"
    script.write_text(FAKE_ENSEMBLE)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setattr(app, "ensemble_command",
                        lambda: [sys.executable, str(script), run_dir.name])

    async def body(app: DashboardApp, pilot: Any) -> None:
        await loaded(app, pilot)
        await pilot.press("e")
        await wait_for(pilot, lambda: "running in the background" in panel_text(app, "#val"))
        await wait_for(pilot, lambda: app.ensemble_process is not None)
        pid = app.ensemble_process.pid
        assert os.getsid(pid) != os.getsid(0), "the ensemble must run in its own session"
        await wait_for(pilot, lambda: "77.77%" in panel_text(app, "#val"))
        val = panel_text(app, "#val")
        assert "epochs 2, 3 → 77.77% ±1.99 on 123 test tasks" in val
        assert "running in the background" not in val
        await wait_for(pilot, lambda: "ensemble: evaluating" in panel_text(app, "#log"))

    run_app(app, body)
    assert (run_dir / "ensemble.log").read_text().startswith("evaluating")


def test_run_dashboard_refuses_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    from engine.errors import UserError

    with pytest.raises(UserError, match="not a run directory"):
        run_dashboard(tmp_path)


def test_e_reports_a_failed_ensemble(run_dir: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "failing_ensemble.py"
    script.write_text("import sys\nprint('error: no validated checkpoint left')\nsys.exit(2)\n")
    app = DashboardApp(run_dir, poll_s=0.2, local_sampling=False)
    monkeypatch.setattr(app, "ensemble_command", lambda: [sys.executable, str(script)])

    async def body(app: DashboardApp, pilot: Any) -> None:
        await loaded(app, pilot)
        await pilot.press("e")
        await wait_for(pilot, lambda: "ensemble: error: no validated checkpoint left"
                       in panel_text(app, "#log"))
        await wait_for(pilot, lambda: "running in the background" not in panel_text(app, "#val"))
        assert app.ensemble_process is None  # so `e` may be pressed again
        # the old result stays on screen
        assert pct(expected(run_dir)["ensemble"]["accuracy"]) in panel_text(app, "#val")

    run_app(app, body)
