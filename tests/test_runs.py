"""Runs end to end: the CLI, the background engine, checkpoints, exact resume, the ensemble."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.reference_maml import task_objective
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


# Runs `mamlpp ARGS` and says on its last line whether torch was imported on the way.
WITHOUT_TORCH = """
import sys
from mamlpp_tui.cli import main
try:
    main(sys.argv[1:])
finally:
    print("torch imported:", "torch" in sys.modules)
"""


@pytest.mark.parametrize("args", [("runs",), ("runs", "--json"), ("show", "RUN"),
                                  ("show", "RUN", "--json"), ("presets",), ("--help",)],
                         ids=" ".join)
def test_run_tables_answer_without_importing_torch(home, finished, args):
    """Listing and showing runs read JSON files only, so they must not pay torch's import
    (seconds on a small machine): the CLI imports torch inside the commands that compute."""
    args = [finished if a == "RUN" else a for a in args]
    r = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *args], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, MAMLPP_HOME=str(home),
                                                        COLUMNS="200"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "torch imported: False", r.stdout
    if args[0] in ("runs", "show"):
        assert finished in r.stdout


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


@pytest.fixture(scope="module")
def nchw(home):
    """A run whose passes all stay NCHW (see test_validation_and_ensemble_member_recomputed).
    Trained with torch's batch norm, max-pool and convolutions: what is checked is evaluation,
    and at the point the compiled kernels' float32 trajectory reaches, 2 of the 300 test tasks hold
    max-pool near-ties that float32 and float64 break apart (logits 1e-3 and 2e-2 off), as any
    float32 path can (test_impl_reference_trains_a_run_and_ends_where_the_default_path_does)."""
    return run_to_end(home, "train.channels_last=never", "train.epochs=2",
                      "train.fused_kernels=off", "train.fft_conv=off", name="nchw")


def reference_adapt(tensors: dict, task, cfg) -> tuple[torch.Tensor, float]:
    """One task adapted and predicted by tests/reference_maml.py from checkpoint tensors, as
    evaluation does (SPEC 2.2-2.5): first order, batch statistics, eval_inner_steps steps with
    the last step's rates and BN row reused past the trained ones; float64. Returns the final
    step's query logits and query loss."""
    def group(prefix):
        return {k[len(prefix) + 1:]: v.double() for k, v in tensors.items()
                if k.startswith(prefix + ".")}

    params = {k: v.requires_grad_() for k, v in group("net").items()}
    steps = cfg.train.eval_inner_steps
    _, losses, logits = task_objective(
        params, group("bn"), group("lslr"), task.x_support[0].double(), task.y_support[0],
        task.x_query[0].double(), task.y_query[0], steps, [0.0] * (steps - 1) + [1.0],
        second_order=False, stages=cfg.model.stages)
    return logits.detach(), losses[-1].item()


def near_ties(logits: torch.Tensor, within: float) -> int:
    """Queries whose two largest logits are closer than `within`: float32 rounding may
    legitimately pick either class there."""
    top = logits.topk(2, dim=-1).values
    return int((top[:, 0] - top[:, 1] < within).sum())


LOGITS_TOL = 1e-4  # float32 engine vs float64 reference; measured 5e-6 on the NCHW path


def test_validation_and_ensemble_member_recomputed_independently(home, nchw, monkeypatch):
    """Every epoch's validation accuracy, CI and loss (val events and the checkpoint's
    history), and one ensemble member's test logits, recomputed from the epoch checkpoints by
    the plain reference on the same fixed tasks (the sampler gives the tasks; adapting,
    scoring and the CI are the reference's and numpy's). The run is NCHW: torch's CPU
    channels-last batch norm computes the batch variance 20-300x less precisely when
    |mean| >> std (binary glyphs), which moved some tasks' logits by 1-4% through the inner
    gradient; on the NCHW path engine and reference agree to ~1e-5."""
    from engine.data import load_dataset, sampler_for
    from engine.run_store import RunDir
    from engine.trainer import run_config

    monkeypatch.setenv("MAMLPP_HOME", str(home))
    d = run_dir(home, nchw)
    cfg = run_config(RunDir(d))
    assert cfg.maml_pp.bn_eval_stats == "batch" and cfg.train.channels_last == "never"
    dataset = load_dataset(cfg.data.dataset)
    queries = cfg.data.ways * cfg.data.queries
    vals = {e["epoch"]: e for e in events(home, nchw) if e["type"] == "val"}
    last = json.loads((d / "checkpoints" / f"epoch-{max(vals):04d}.json").read_text())
    assert [h["epoch"] for h in last["history"]] == sorted(vals) == [0, 1]
    sampler = sampler_for(cfg, "val", dataset)
    for entry in last["history"]:
        epoch = entry["epoch"]
        tensors = load_file(d / "checkpoints" / f"epoch-{epoch:04d}.safetensors")
        correct, losses, ties = [], [], 0
        for t in range(cfg.eval.val_tasks):
            task = sampler.batch(t, 1)
            logits, loss = reference_adapt(tensors, task, cfg)
            correct.append(int((logits.argmax(-1) == task.y_query[0]).sum()))
            losses.append(loss)
            ties += near_ties(logits, LOGITS_TOL)
        acc = np.array(correct) / queries
        event = vals[epoch]
        assert event["tasks"] == entry["tasks"] == cfg.eval.val_tasks
        engine_correct = round(event["accuracy"] * cfg.eval.val_tasks * queries)
        assert abs(engine_correct - sum(correct)) <= ties, (epoch, engine_correct, correct)
        if not ties:
            assert event["accuracy"] == pytest.approx(acc.mean(), abs=1e-12)
            assert event["ci95"] == pytest.approx(1.96 * acc.std() / math.sqrt(len(acc)),
                                                  rel=1e-9)
        assert event["loss"] == pytest.approx(float(np.mean(losses)), rel=1e-5)
        for key in ("accuracy", "ci95", "loss"):
            assert entry[key] == event[key], (epoch, key)

    result = json.loads((d / "ensemble.json").read_text())
    saved = load_file(d / "ensemble-logits.safetensors")
    epoch = result["members"][0]
    tensors = load_file(d / "checkpoints" / f"epoch-{epoch:04d}.safetensors")
    sampler = sampler_for(cfg, "test", dataset)
    assert saved["member_logits"].shape[:2] == (len(result["members"]), cfg.eval.test_tasks)
    correct, ties = 0, 0
    for t in range(cfg.eval.test_tasks):
        task = sampler.batch(t, 1)
        logits, _ = reference_adapt(tensors, task, cfg)
        assert torch.equal(saved["labels"][t], task.y_query[0])
        torch.testing.assert_close(saved["member_logits"][0, t].double(), logits,
                                   rtol=0, atol=LOGITS_TOL)
        correct += int((logits.argmax(-1) == task.y_query[0]).sum())
        ties += near_ties(logits, LOGITS_TOL)
    total = cfg.eval.test_tasks * queries
    assert abs(round(result["member_accuracies"][0] * total) - correct) <= ties


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


def _kill_and_resume_at(home, run_id, targets) -> int:
    """SIGKILL the run once its status reaches each target iteration and resume it; returns
    how many kills landed before it finished."""
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
    return kills


def test_kill9_at_random_moments_then_resume_is_bit_identical(home, finished):
    # kill at random iterations (the status is written every iteration of this config); a
    # resumed 12-iteration run can finish before the poller sees a later target when the test
    # shares the CPU with other tests, so a run with fewer than two kills is run again
    targets = sorted(random.Random(7).sample(range(1, 12), 3))
    attempts = []
    for attempt in range(3):
        run_id = start(home, "train.checkpoint_every=3", name=f"killed-{attempt}")
        attempts.append(_kill_and_resume_at(home, run_id, targets))
        if attempts[-1] >= 2:
            break
    assert attempts[-1] >= 2, (targets, attempts, story(home, run_id))
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
