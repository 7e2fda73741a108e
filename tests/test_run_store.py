"""Run directory, engine lock, status truth, event log and control commands."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine import control
from engine.errors import UserError
from engine.events import EventWriter, read_events
from engine.run_store import create_run, find_run, list_runs, new_run_id

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"name": "quickstart", "train": {"epochs": 1}}


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMLPP_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_new_run_id_is_readable():
    assert re.fullmatch(r"quickstart-\d{8}-\d{6}-[0-9a-f]{4}", new_run_id("quickstart"))
    assert new_run_id("my run/1").startswith("my-run-1-")


def test_create_run_layout_and_unique_ids(home):
    runs = [create_run(CONFIG) for _ in range(25)]
    assert len({r.run_id for r in runs}) == 25
    run = runs[0]
    assert run.path.parent == home / "runs"
    assert run.read_config() == CONFIG
    assert run.checkpoints_dir.is_dir() and run.events_path.exists()
    assert run.read_status()["state"] == "stopped"
    listed = list_runs()  # oldest first; runs made within one timestamp tick tie
    assert {r.run_id for r in listed} == {r.run_id for r in runs}
    stamps = [r.config_path.stat().st_mtime_ns for r in listed]
    assert stamps == sorted(stamps)


def test_find_run_by_id_and_prefix():
    a1 = create_run(CONFIG, name="alpha")
    a2 = create_run(CONFIG, name="alpha")
    b = create_run(CONFIG, name="beta")
    assert find_run(a1.run_id) == a1 and find_run(a2.run_id) == a2
    assert find_run("bet") == b
    with pytest.raises(UserError, match="ambiguous") as info:
        find_run("alpha")
    assert a1.run_id in str(info.value) and a2.run_id in str(info.value)
    with pytest.raises(UserError, match="No run matches"):
        find_run("gamma")


def test_status_merges_fields():
    run = create_run(CONFIG)
    run.write_status(state="stopped", iteration=5, epoch=1)
    run.write_status(iteration=7)
    status = run.read_status()
    assert (status["state"], status["iteration"], status["epoch"]) == ("stopped", 7, 1)
    assert status["updated"] > 0
    with pytest.raises(ValueError):
        run.write_status(state="exploded")


def test_running_status_without_engine_reads_as_failed():
    run = create_run(CONFIG)
    run.write_status(state="running", pid=os.getpid())  # nobody holds the lock
    status = run.read_status()
    assert status["state"] == "failed"
    assert status["error"] == f"engine process {os.getpid()} is no longer running"
    assert json.loads(run.status_path.read_text())["state"] == "running"  # not rewritten
    assert run.reconcile_status()["state"] == "failed"
    assert json.loads(run.status_path.read_text())["state"] == "failed"


HOLDER = """
import sys, time
from engine.run_store import find_run
run = find_run(sys.argv[1])
run.acquire_lock()
run.write_status(state="running", pid=__import__("os").getpid())
print("ready", flush=True)
time.sleep(60)
"""

CONTENDER = """
import sys
from engine.errors import UserError
from engine.run_store import find_run
try:
    find_run(sys.argv[1]).acquire_lock(wait=0.1)
except UserError as e:
    print(e)
    sys.exit(3)
"""


def _python(code: str, *args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, text=True, **kw)


def test_lock_excludes_second_engine_and_dies_with_sigkill():
    run = create_run(CONFIG)
    holder = _python(HOLDER, run.run_id)
    try:
        assert holder.stdout.readline().strip() == "ready"
        contender = _python(CONTENDER, run.run_id)
        out, _ = contender.communicate(timeout=30)
        assert contender.returncode == 3
        assert f"already running (pid {holder.pid})" in out
        assert run.is_locked()
        assert run.read_status()["state"] == "running"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        holder.stdout.close()
    assert not run.is_locked()
    status = run.read_status()
    assert status["state"] == "failed"
    assert status["error"] == f"engine process {holder.pid} is no longer running"
    run.acquire_lock()  # free again for a resume
    try:
        assert run.is_locked()
    finally:
        run.release_lock()
    assert not run.is_locked()


def test_events_strict_json_and_partial_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    with EventWriter(path) as w:
        w.write("train", iteration=1, epoch=0, loss=float("nan"), step_losses=[1.0, float("inf")])
        w.write("val", iteration=2, epoch=0, accuracy=0.5)
    for line in path.read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    events, offset = read_events(path)
    assert [e["type"] for e in events] == ["train", "val"]
    assert events[0]["loss"] is None and events[0]["step_losses"] == [1.0, None]
    assert {"time", "iteration", "epoch"} <= set(events[1])
    assert offset == path.stat().st_size
    # A writer caught mid-line: the half line stays invisible until it is finished.
    with open(path, "ab") as f:
        f.write(b'{"type": "state", "iteration": 3, "epo')
    assert read_events(path, offset) == ([], offset)
    with open(path, "ab") as f:
        f.write(b'ch": 0}\nnot json at all\n{"type": "system", "iteration": 4, "epoch": 0}\n')
    events, offset2 = read_events(path, offset)
    assert [e["type"] for e in events] == ["state", "system"]  # corrupted line skipped
    assert offset2 == path.stat().st_size
    assert read_events(path, offset2) == ([], offset2)
    assert read_events(tmp_path / "missing.jsonl") == ([], 0)


def test_control_two_sends_are_polled_once_each():
    run = create_run(CONFIG)
    reader = control.ControlReader(run)
    id1 = control.send(run, "pause")
    id2 = control.send(run.path, "checkpoint")
    assert id2 > id1
    assert reader.poll() == ["pause", "checkpoint"]
    assert reader.poll() == []
    control.send(run, "stop")
    assert reader.poll() == ["stop"]
    # A new engine ignores commands sent to its dead predecessor.
    assert control.ControlReader(run).poll() == []
    assert control.ControlReader(run, skip_pending=False).poll() == [
        "pause", "checkpoint", "stop"]
    with pytest.raises(UserError, match="Unknown command"):
        control.send(run, "explode")
