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


# The checkpoints `finished`'s config saves, in order (checkpoint_every=3, 4 iterations an
# epoch): (name, iteration). A kill inside a save resumes from the one before it, or from it
# once latest.json points at it.
SAVES = [("iter-00000003", 3), ("epoch-0000", 4), ("iter-00000006", 6), ("epoch-0001", 8),
         ("iter-00000009", 9), ("epoch-0002", 12)]


def kill_at(point: str, nth: int) -> dict[str, str]:
    """The engine's test hook: SIGKILL itself at `point` of its nth checkpoint save."""
    return {"MAMLPP_TEST_KILL_AT": f"{point}:{nth}"}


def killed_in_save(home, point: str, nth: int, name: str) -> str:
    """A run of `finished`'s config killed at `point` of its nth save; returns its id."""
    r = mamlpp(home, "run", "--no-tui", "--name", name, *sets("train.checkpoint_every=3"),
               env=kill_at(point, nth))
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    (run_id,) = [d.name for d in (home / "runs").iterdir() if d.name.startswith(name + "-")]
    return run_id


def resumed_at(home, run_id) -> list[int]:
    return [e["iteration"] for e in events(home, run_id)
            if e["type"] == "state" and e["reason"] == "resumed"]


def assert_same_end(home, run_id, reference):
    """Bit-identical final tensors, the same validation history, the same checkpoints kept and
    no temp file left behind."""
    a, b = final_tensors(home, run_id), final_tensors(home, reference)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), (k, story(home, run_id))

    def kept(rid):
        ckpts = run_dir(home, rid) / "checkpoints"
        return sorted(p.name for p in ckpts.iterdir())

    assert kept(run_id) == kept(reference)  # no temp, no half-saved checkpoint
    sidecar = [json.loads((run_dir(home, rid) / "checkpoints" / "epoch-0002.json").read_text())
               for rid in (run_id, reference)]
    assert sidecar[0]["history"] == sidecar[1]["history"]


# One run killed inside save_checkpoint at every point in turn, each kill in the process that
# resumed from the one before: (point, nth save of that process, iteration resumed from next).
KILLS = [
    ("tensor-temp", 2, 3),     # epoch-0000's tensor temp only: the temp is swept later
    ("dir-synced", 1, 3),      # epoch-0000 complete, latest.json still on iter-3
    ("temps", 2, 4),           # iter-6's two temps, nothing renamed
    ("tensor-renamed", 2, 6),  # epoch-0001's tensor file without its sidecar
    ("renamed", 2, 8),         # iter-9 complete (directory not fsynced), pointer on epoch-0001
    ("saved", 1, 9),           # iter-9 saved again and pointed at, not yet pruned
]


def test_kill9_inside_save_checkpoint_then_resume_is_bit_identical(home, finished):
    (point, nth, _), *rest = KILLS
    run_id = killed_in_save(home, point, nth, name="in-save")
    for point, nth, _ in rest:
        r = mamlpp(home, "resume", run_id, "--no-tui", env=kill_at(point, nth))
        assert r.returncode == -signal.SIGKILL, (point, r.stdout + r.stderr)
    r = mamlpp(home, "resume", run_id, "--no-tui")
    assert r.returncode == 0, r.stdout + r.stderr + story(home, run_id)
    assert status(home, run_id)["state"] == "finished"
    assert resumed_at(home, run_id) == [at for _, _, at in KILLS]
    assert_same_end(home, run_id, finished)


def test_truncated_newest_checkpoint_falls_back_and_finishes(home, finished):
    # killed right after epoch-0001 (iteration 8) was saved: iter-6 and epoch-0 are kept too
    run_id = killed_in_save(home, "saved", 4, name="trunc")
    ckpts = run_dir(home, run_id) / "checkpoints"
    newest = json.loads((ckpts / "latest.json").read_text())["name"]
    assert newest == "epoch-0001"
    path = ckpts / f"{newest}.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    r = mamlpp(home, "resume", run_id, "--no-tui")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"checkpoint {newest} is unusable (truncated" in r.stdout and "falling back" in r.stdout
    assert resumed_at(home, run_id) == [6]  # the newest valid one: iter-6, not epoch-0 (4)
    assert status(home, run_id)["state"] == "finished"
    assert_same_end(home, run_id, finished)


def test_checkpoint_of_another_config_is_refused(home):
    """config.json changed after the checkpoint was made (another digest): resume says so in
    one sentence and exits 2, and deletes nothing."""
    run_id = killed_in_save(home, "saved", 2, name="digest")  # epoch-0000 saved, iteration 4
    d = run_dir(home, run_id)
    config = json.loads((d / "config.json").read_text())
    config["train"]["meta_lr"] *= 2  # any key the digest covers
    (d / "config.json").write_text(json.dumps(config))

    def files():  # the checkpoints and the config, byte for byte
        return {p.relative_to(d): p.read_bytes()
                for p in [d / "config.json", *sorted((d / "checkpoints").iterdir())]}

    before = files()
    r = mamlpp(home, "resume", run_id, "--no-tui")
    _one_sentence_error(r)
    assert r.returncode == 2
    assert "Checkpoint epoch-0000 was made with a different config" in r.stderr
    assert files() == before


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
