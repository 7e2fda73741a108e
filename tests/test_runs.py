"""Runs end to end: the CLI, the background engine, checkpoints, exact resume, the ensemble."""

from __future__ import annotations

import json
import os
import random
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.run_fixtures import (
    events,
    final_tensors,
    mamlpp,
    run_dir,
    sets,
    status,
    story,
    wait_for,
)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("home")


def start(home, *extra: str, name: str) -> str:
    r = mamlpp(home, "run", "--detach", "--name", name, *sets(*extra))
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


def run_to_end(home, *extra: str, name: str) -> str:
    r = mamlpp(home, "run", "--no-tui", "--name", name, *sets(*extra))
    assert r.returncode == 0, r.stdout + r.stderr
    return next(line.split()[1] for line in r.stdout.splitlines() if line.startswith("run "))


@pytest.fixture(scope="module")
def finished(home):
    return run_to_end(home, "train.checkpoint_every=3", name="ref")


def test_foreground_run_writes_the_run_directory(home, finished):
    d = run_dir(home, finished)
    assert status(home, finished)["state"] == "finished"
    config = json.loads((d / "config.json").read_text())
    assert config["train"]["epochs"] == 3 and config["runtime"]["device"] == "cpu"
    ev = events(home, finished)
    types = {e["type"] for e in ev}
    assert {"train", "lslr", "val", "checkpoint", "ensemble", "system", "state"} <= types
    for e in ev:
        assert {"type", "time", "iteration", "epoch"} <= e.keys()
    train = [e for e in ev if e["type"] == "train"]
    assert len(train) == 12 and all(len(e["step_losses"]) == 2 for e in train)
    assert train[0]["msl_weights"] == [0.5, 0.5] and train[-1]["msl_weights"] == [0.0, 1.0]
    assert train[0]["step_losses"][0] is not None and train[-1]["step_losses"][0] is None
    assert [e["second_order"] for e in train[::4]] == [False, True, True]
    vals = [e for e in ev if e["type"] == "val"]
    assert [v["epoch"] for v in vals] == [0, 1, 2]
    assert all(0 <= v["accuracy"] <= 1 and v["ci95"] >= 0 and v["tasks"] == 10 for v in vals)
    lslr = [e for e in ev if e["type"] == "lslr"]
    assert len(lslr) == 4 and len(lslr[-1]["rates"]) == 10
    # kept: newest plus the top-3 epochs (all three here); iteration checkpoints pruned
    names = sorted(p.stem for p in (d / "checkpoints").glob("*.safetensors"))
    assert names == ["epoch-0000", "epoch-0001", "epoch-0002"]
    r = mamlpp(home, "runs", "--json")
    listed = {x["id"]: x for x in json.loads(r.stdout)}
    assert listed[finished]["state"] == "finished"
    assert listed[finished]["iteration"] == 12
    shown = json.loads(mamlpp(home, "show", finished[:12], "--json").stdout)
    assert [h["epoch"] for h in shown["val_history"]] == [0, 1, 2]


def test_ensemble_uses_top_k_epochs_and_averaged_logits(home, finished):
    vals = {e["epoch"]: e["accuracy"] for e in events(home, finished) if e["type"] == "val"}
    r = mamlpp(home, "ensemble", finished, "--top-k", "2", "--tasks", "12", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    best = sorted(vals, key=lambda e: (-vals[e], e))[:2]
    assert result["members"] == best
    assert json.loads((run_dir(home, finished) / "ensemble.json").read_text()) == result
    saved = load_file(run_dir(home, finished) / "ensemble-logits.safetensors")
    logits, labels = saved["member_logits"].numpy(), saved["labels"].numpy()
    assert logits.shape[:2] == (2, 12)
    by_hand = (logits.mean(axis=0).argmax(-1) == labels).mean(axis=-1)
    assert result["accuracy"] == pytest.approx(by_hand.mean(), abs=1e-12)
    assert result["ci95"] == pytest.approx(1.96 * by_hand.std() / np.sqrt(12), abs=1e-12)
    for m, acc in enumerate(result["member_accuracies"]):
        assert acc == pytest.approx((logits[m].argmax(-1) == labels).mean(), abs=1e-12)
    table = mamlpp(home, "ensemble", finished, "--top-k", "2", "--tasks", "12").stdout
    assert "ensemble" in table and f"epoch {best[0]}" in table


def _kill(home, run_id):
    pid = status(home, run_id)["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid), timeout=10)


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] == "Z"
    except OSError:
        return True


def test_kill9_at_random_moments_then_resume_is_bit_identical(home, finished):
    # kill at random iterations (the status is written every iteration of this config)
    targets = sorted(random.Random(7).sample(range(1, 12), 3))
    run_id = start(home, "train.checkpoint_every=3", name="killed")
    kills = 0
    for target in targets:
        wait_for(lambda t=target: status(home, run_id).get("iteration", 0) >= t
                 or status(home, run_id).get("state") == "finished", timeout=60, every=0.005)
        if status(home, run_id)["state"] != "finished":
            _kill(home, run_id)
            kills += 1
            r = mamlpp(home, "runs", "--json")
            listed = {x["id"]: x for x in json.loads(r.stdout)}
            assert listed[run_id]["state"] in ("failed", "finished"), story(home, run_id)
            r = mamlpp(home, "resume", run_id, "--detach")
            assert r.returncode == 0, r.stderr + story(home, run_id)
    assert wait_for(lambda: status(home, run_id)["state"] == "finished", timeout=120), \
        story(home, run_id)
    assert kills >= 2, (targets, story(home, run_id))
    a, b = final_tensors(home, run_id), final_tensors(home, finished)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, story(home, run_id))


def test_truncated_newest_checkpoint_falls_back_and_finishes(home, finished):
    run_id = start(home, "train.checkpoint_every=1", "train.iters_per_epoch=6", name="trunc")
    assert wait_for(lambda: status(home, run_id)["iteration"] >= 8, timeout=60)
    _kill(home, run_id)
    ckpts = run_dir(home, run_id) / "checkpoints"
    newest = json.loads((ckpts / "latest.json").read_text())["name"]
    path = ckpts / f"{newest}.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    r = mamlpp(home, "resume", run_id, "--no-tui")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"checkpoint {newest} is unusable" in r.stdout and "falling back" in r.stdout
    assert status(home, run_id)["state"] == "finished"


def test_pause_unpause_stop_act_through_control(home):
    run_id = start(home, "train.epochs=50", name="steer")
    assert wait_for(lambda: status(home, run_id)["iteration"] >= 2, timeout=60)
    r = mamlpp(home, "pause", run_id)
    assert r.returncode == 0 and status(home, run_id)["state"] == "paused"
    held = status(home, run_id)["iteration"]
    r = mamlpp(home, "resume", run_id)
    assert r.returncode == 2 and "already running" in r.stderr
    assert status(home, run_id)["iteration"] == held
    assert mamlpp(home, "unpause", run_id).returncode == 0
    assert wait_for(lambda: status(home, run_id)["iteration"] > held + 1, timeout=60)
    r = mamlpp(home, "stop", run_id)
    st = status(home, run_id)
    assert r.returncode == 0 and st["state"] == "stopped"
    latest = json.loads((run_dir(home, run_id) / "checkpoints" / "latest.json").read_text())
    sidecar = json.loads((run_dir(home, run_id) / "checkpoints" / f"{latest['name']}.json")
                         .read_text())
    assert sidecar["iteration"] == st["iteration"] and sidecar["reason"] == "stop"


def _one_sentence_error(r):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr + r.stdout
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr


@pytest.mark.parametrize("args, words", [
    (["run", "--preset", "nope", "--no-tui"], "Unknown preset"),
    (["run", "--set", "train.bogus=1", "--no-tui"], "train.bogus"),
    (["run", "--set", "data.ways=1", "--no-tui"], "data.ways"),
    (["run", "--set", "data.ways=five", "--no-tui"], "data.ways"),
    (["run", "--preset", "omniglot-5w1s", "--no-tui"], "mamlpp data fetch omniglot"),
    (["run", "--config", "/nonexistent.toml", "--no-tui"], "does not exist"),
    (["run", "--device", "cuda", "--no-tui"], "no CUDA"),
    (["resume", "no-such-run"], "No run matches"),
    (["show", "no-such-run"], "No run matches"),
    (["pause", "no-such-run"], "No run matches"),
    (["ensemble", "no-such-run"], "No run matches"),
    (["presets", "nope"], "Unknown preset"),
])
def test_user_errors_are_one_sentence(home, args, words):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("has a GPU")
    r = mamlpp(home, *args)
    _one_sentence_error(r)
    assert words in r.stderr


def test_run_state_errors(home, finished):
    r = mamlpp(home, "resume", finished)
    _one_sentence_error(r)
    assert "already finished" in r.stderr
    r = mamlpp(home, "pause", finished)
    _one_sentence_error(r)
    assert "not running" in r.stderr
    os.environ["MAMLPP_HOME"] = str(home)
    try:
        from engine.run_store import create_run

        empty = create_run({"name": "empty"}, name="empty")
    finally:
        del os.environ["MAMLPP_HOME"]
    r = mamlpp(home, "ensemble", empty.run_id)
    _one_sentence_error(r)
    assert "no validated epoch checkpoints" in r.stderr
