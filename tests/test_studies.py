"""Studies: the ablation ladder against SPEC.md, bad input, the result table recomputed from the
members' files, the study view, and real studies end to end (two jobs at once, `--dry-run`
commands run by hand elsewhere and collected, kill -9 of the study process then resume)."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.config import resolve
from engine.events import EventWriter, read_events
from engine.msl import msl_weights
from engine.run_store import RunDir, atomic_write_json
from engine.schedule import second_order_at
from tests.helpers import one_line_error, run_main
from tests.run_fixtures import final_tensors, sets, wait_for

# ---------------------------------------------------------------- the ladder, from SPEC.md

# SPEC.md section 2, written out here (not imported): each technique's [maml_pp] switch, its
# value with the technique off, and on (None: the base preset's own value).
SPEC_SWITCHES = {
    "MSL": ("msl", False, True),  # 2.1 multi-step loss
    "DA": ("first_order_epochs", 0, None),  # 2.2 first order while epoch < first_order_epochs
    "BNRS": ("bn_per_step_stats", False, True),  # 2.3 per-step BN running statistics
    "BNWB": ("bn_per_step_affine", False, True),  # 2.4 per-step BN weights and biases
    "LSLR": ("lslr", False, True),  # 2.5 learned per-layer per-step inner rates
    "CA": ("cosine", False, True),  # 2.6 cosine annealing of the meta learning rate
}
# The ladder: plain MAML (every switch off, second order throughout), then cumulative.
LADDER = {
    "maml": set(),
    "+bnrs+bnwb": {"BNRS", "BNWB"},
    "+lslr": {"BNRS", "BNWB", "LSLR"},
    "+msl": {"BNRS", "BNWB", "LSLR", "MSL"},
    "+da": {"BNRS", "BNWB", "LSLR", "MSL", "DA"},
    "+ca": {"BNRS", "BNWB", "LSLR", "MSL", "DA", "CA"},
}
ALL = set(SPEC_SWITCHES)


def _variant_configs(**kwargs) -> dict[str, list[dict]]:
    from engine.studies import plan_ablation

    plan = plan_ablation("quickstart", None, [], [0, 1], **kwargs)
    out: dict[str, list[dict]] = {}
    for m in plan.members:
        out.setdefault(m["variant"], []).append(m["config"])
    return out


def _check_switches(config: dict, on: set[str], base: dict) -> None:
    p, b = config["maml_pp"], base["maml_pp"]
    for technique, (key, off, on_value) in SPEC_SWITCHES.items():
        want = (b[key] if on_value is None else on_value) if technique in on else off
        assert p[key] == want, (technique, key, p[key], want)
    assert p["second_order"] is True  # MAML and MAML++ are second-order methods
    # nothing but the switches differs from the preset
    rest = {k: v for k, v in p.items() if k not in {s[0] for s in SPEC_SWITCHES.values()}}
    assert rest == dict({k: v for k, v in b.items() if k in rest}, second_order=True)
    for section in ("data", "model", "eval"):
        assert config[section] == base[section]
    assert {k: v for k, v in config["train"].items() if k != "seed"} == \
        {k: v for k, v in base["train"].items() if k != "seed"}


def test_each_ladder_variant_has_exactly_the_switches_spec_says() -> None:
    base = resolve("quickstart").to_dict()
    assert base["maml_pp"]["first_order_epochs"] >= 1  # so DA on and off differ
    configs = _variant_configs()
    assert list(configs) == list(LADDER)  # the ladder's order, maml first, full MAML++ last
    for name, on in LADDER.items():
        assert [c["train"]["seed"] for c in configs[name]] == [0, 1]
        for config in configs[name]:
            _check_switches(config, on, base)
    # what the switches mean to the engine: plain MAML is second order from epoch 0 and counts
    # only the final step's loss; +da starts first order; full MAML++ anneals the meta lr
    maml, da = (resolve("quickstart", overrides=[f"maml_pp.{k}={json.dumps(v)}"
                for k, v in configs[n][0]["maml_pp"].items()]) for n in ("maml", "+da"))
    assert second_order_at(0, maml) and not second_order_at(0, da)
    assert second_order_at(base["maml_pp"]["first_order_epochs"], da)
    steps = base["train"]["inner_steps"]
    assert msl_weights(0, steps, maml.maml_pp.msl_epochs, maml.maml_pp.msl)[-1] == 1.0
    assert msl_weights(0, steps, da.maml_pp.msl_epochs, da.maml_pp.msl)[0] > 0


def test_leave_one_out_drops_exactly_one_technique_per_row() -> None:
    base = resolve("quickstart").to_dict()
    configs = _variant_configs(leave_one_out=True)
    assert list(configs)[0] == "maml++"
    _check_switches(configs["maml++"][0], ALL, base)
    assert len(configs) == 1 + len(ALL)
    for technique in ALL:
        _check_switches(configs[f"-{technique.lower()}"][0], ALL - {technique}, base)


# ---------------------------------------------------------------- the CLI, in process


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MAMLPP_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_ablate_list_prints_the_variants_and_runs_nothing(home: Path, capsys) -> None:
    code, out, _ = run_main(capsys, "ablate", "quickstart", "--list")
    assert code == 0
    for name in LADDER:
        assert name in out
    for key, _, _ in SPEC_SWITCHES.values():
        assert f"maml_pp.{key}" in out
    code, out, _ = run_main(capsys, "ablate", "--list", "--leave-one-out")
    assert code == 0 and "-lslr" in out and "maml++" in out
    assert not (home / "studies").exists() and not (home / "runs").exists()


@pytest.mark.parametrize("argv, words", [
    (["ablate", "nope"], "Unknown preset"),
    (["sweep", "nope", "--seeds", "0,1"], "Unknown preset"),
    (["ablate", "--variants", "maml,+bogus"], "Unknown variant '+bogus'"),
    (["sweep", "--grid", "train.bogus=1,2"], "train.bogus"),
    (["sweep", "--grid", "train.inner_steps=1,x"], "train.inner_steps must be a whole number"),
    (["sweep", "--grid", "train.seed=1,2"], "--seeds"),
    (["sweep", "--seeds", "0,a"], "--seeds takes whole numbers"),
    (["sweep", "--seeds", "1.5"], "--seeds takes whole numbers"),
    (["sweep", "--seeds", "0,0"], "twice"),
    (["sweep", "--seeds", "0,1", "--set", "train.seed=3"], "--seeds"),
    (["ablate", "--set", "maml_pp.lslr=false"], "maml_pp.lslr is a switch"),
    (["ablate", "--set", "maml_pp.first_order_epochs=0"], "first_order_epochs >= 1"),
    (["sweep", "--name", "bad/name", "--dry-run"], "Study name 'bad/name'"),
    (["study", "show", "nope"], "No study matches 'nope'"),
    (["study", "resume", "nope"], "No study matches 'nope'"),
    (["watch", "nope"], "No run or study matches 'nope'"),
    (["run", "--study", "s"], "--study and --variant together"),
    (["study", "show", "x", "--json", "--csv"], "at most one of"),
])
def test_bad_input_is_one_sentence_and_exit_2(home: Path, capsys, argv, words) -> None:
    code, _, err = run_main(capsys, *argv)
    assert words in one_line_error(code, err)
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())
    assert not (home / "studies").exists() or not any((home / "studies").iterdir())


def test_same_name_with_other_settings_is_refused(home: Path, capsys) -> None:
    code, out, _ = run_main(capsys, "sweep", "--seeds", "0", "--name", "s1", "--dry-run")
    assert code == 0 and out.count("mamlpp run") == 1
    before = (home / "studies" / "s1" / "study.json").read_text()
    code, _, err = run_main(capsys, "sweep", "--seeds", "0,1", "--name", "s1", "--dry-run")
    line = one_line_error(code, err)
    assert "different settings" in line and "mamlpp study resume s1" in line
    assert (home / "studies" / "s1" / "study.json").read_text() == before
    # the same settings again: the same study, the same commands
    code, out2, _ = run_main(capsys, "sweep", "--seeds", "0", "--name", "s1", "--dry-run")
    assert code == 0 and out2 == out


# ---------------------------------------------------------------- synthetic members


def make_study(capsys, name: str, *argv: str) -> Any:
    from engine.studies import find_study

    code, out, err = run_main(capsys, *argv, "--name", name, "--dry-run")
    assert code == 0, err
    return find_study(name)


def tagged_run(study, variant: str, seed: int) -> RunDir:
    from engine.config import from_dict
    from engine.studies import create_tagged_run

    return create_tagged_run(study.id, variant, from_dict(study.member(variant, seed).config))


def finish(run: RunDir, test: float, members: list[float], ci: float, vals: list[float],
           t0: float, seconds: float, speeds: list[float]) -> None:
    """Write what a finished engine leaves: events, a checkpoint sidecar, ensemble.json."""
    cfg = run.read_config()
    total = cfg["train"]["epochs"] * cfg["train"]["iters_per_epoch"]
    with EventWriter(run.events_path) as ev:
        ev.write("state", iteration=0, epoch=0, time=t0, state="running", reason="started")
        for i, s in enumerate(speeds):
            ev.write("train", iteration=i + 1, epoch=0, time=t0 + 1 + i, iters_per_sec=s)
        ev.write("state", iteration=total, epoch=0, time=t0 + seconds, state="finished",
                 reason="all epochs done")
    history = [{"epoch": e, "accuracy": a, "ci95": 0.01, "loss": 1.0, "tasks": 10}
               for e, a in enumerate(vals)]
    atomic_write_json(run.checkpoints_dir / "epoch-0001.json",
                      {"iteration": total, "epoch": 1, "history": history})
    atomic_write_json(run.checkpoints_dir / "epoch-0000.json",
                      {"iteration": 1, "epoch": 0, "history": history[:1]})
    run.write_ensemble({"members": [1, 0], "member_accuracies": members,
                        "member_ci95": [0.02, 0.02], "accuracy": test, "ci95": ci, "tasks": 12})
    run.write_status(state="finished", iteration=total, epoch=1, pid=None)


def test_table_is_mean_and_std_of_the_members_files(home: Path, capsys) -> None:
    study = make_study(capsys, "syn", "sweep", *sets(), "--seeds", "0,1,2",
                       "--grid", "train.meta_lr=0.001,0.002")
    assert [v["name"] for v in study.variants] == ["meta_lr=0.001", "meta_lr=0.002"]
    results = {("meta_lr=0.001", 0): 0.61, ("meta_lr=0.001", 1): 0.65, ("meta_lr=0.001", 2): 0.6,
               ("meta_lr=0.002", 0): 0.7}
    runs = {}
    for i, ((variant, seed), acc) in enumerate(results.items()):
        runs[variant, seed] = run = tagged_run(study, variant, seed)
        finish(run, acc, [acc - 0.02, acc - 0.01 * i], 0.05 + i / 100, [0.5, acc + 0.03],
               1000.0, 10.0 + i, [2.0, 3.0 + i, 5.0])
    tagged_run(study, "meta_lr=0.002", 1)  # started, not finished; seed 2: no run yet
    code, out, err = run_main(capsys, "study", "show", "syn", "--json")
    assert code == 0, err
    table = json.loads(out)
    assert table["study"] == "syn" and table["state"] == "incomplete"
    for row in table["rows"]:
        mine = [(s, RunDir(home / "runs" / m["run"])) for (v, s), _ in results.items()
                for m in row["members"] if v == row["variant"] and m["seed"] == s]
        ens = [json.loads((r.path / "ensemble.json").read_text()) for _, r in mine]
        accs = [e["accuracy"] for e in ens]
        assert row["finished"] == len(accs)
        assert row["test_accuracy_mean"] == pytest.approx(statistics.fmean(accs))
        if len(accs) > 1:
            assert row["test_accuracy_std"] == pytest.approx(statistics.stdev(accs))
        else:
            assert row["test_accuracy_std"] is None
        best = [max(e["member_accuracies"]) for e in ens]
        assert row["best_epoch_test_accuracy_mean"] == pytest.approx(statistics.fmean(best))
        assert row["ci95"] == [e["ci95"] for e in ens]
        for m in row["members"]:
            run = RunDir(home / "runs" / m["run"]) if m["run"] else None
            if run and run.ensemble_path.exists():
                e = json.loads(run.ensemble_path.read_text())
                assert (m["test_accuracy"], m["ci95"]) == (e["accuracy"], e["ci95"])
                assert m["state"] == "finished"
    lone = table["rows"][1]
    assert lone["variant"] == "meta_lr=0.002" and lone["unfinished"] == {
        "not started": 1, "stopped": 1}
    assert [m["state"] for m in lone["members"]] == ["finished", "stopped", "not started"]
    m0 = table["rows"][0]["members"][1]
    assert m0["wall_s"] == pytest.approx(11.0) and m0["iters_per_sec"] == pytest.approx(4.0)
    assert m0["best_val_accuracy"] == pytest.approx(0.68)
    # the same numbers in every format
    code, csv_out, _ = run_main(capsys, "study", "show", "syn", "--csv")
    assert code == 0 and csv_out.splitlines()[1].startswith("meta_lr=0.001,train.meta_lr=0.001,")
    assert repr(table["rows"][0]["test_accuracy_mean"]) in csv_out
    mean, std = table["rows"][0]["test_accuracy_mean"], table["rows"][0]["test_accuracy_std"]
    cell = f"{100 * mean:.2f} ± {100 * std:.2f}"
    code, md, _ = run_main(capsys, "study", "show", "syn", "--markdown")
    assert code == 0 and f"| `meta_lr=0.001` | 3/3 | {cell} |" in md
    code, tex, _ = run_main(capsys, "study", "show", "syn", "--latex")
    assert code == 0 and cell.replace("±", r"$\pm$") in tex and r"\bottomrule" in tex
    assert "1/3: 1 not started, 1 stopped" in md
    # identifying columns stay whole at 80 and 60 columns
    for width in (80, 60):
        os.environ["COLUMNS"] = str(width)
        try:
            code, text, _ = run_main(capsys, "study", "show", "syn")
        finally:
            del os.environ["COLUMNS"]
        assert code == 0 and max(len(line) for line in text.splitlines()) <= width
        assert "meta_lr=0.001" in text and "1/3: 1 not started, 1 stopped" in text.replace(
            "│\n│", "")
        assert "…" not in text
    code, out, _ = run_main(capsys, "studies", "--json")
    assert code == 0 and json.loads(out) == [dict(json.loads(out)[0], id="syn", finished=4,
                                                  members=6, state="incomplete", error=None)]


def test_edited_or_deleted_member_runs_are_refused_and_kept(home: Path, capsys) -> None:
    study = make_study(capsys, "ed", "sweep", *sets(), "--seeds", "0,1")
    a, b = tagged_run(study, "base", 0), tagged_run(study, "base", 1)
    code, _, err = run_main(capsys, "study", "show", "ed")
    assert code == 0, err
    # the same member again, by hand: refused, no second run
    cfg = study.member("base", 0).config
    code, _, err = run_main(capsys, "run", *sets(), "--set", "train.seed=0", "--study", "ed",
                            "--variant", "base", "--no-tui")
    assert f"already has run {a.run_id}" in one_line_error(code, err)
    code, _, err = run_main(capsys, "run", *sets(), "--set", "train.seed=0",
                            "--set", "train.meta_lr=0.01", "--study", "ed", "--variant",
                            "base", "--no-tui")
    assert "train.meta_lr is 0.01 where the study asked" in one_line_error(code, err)
    assert sorted(p.name for p in (home / "runs").iterdir()) == sorted([a.run_id, b.run_id])
    # a config edited by hand
    raw = a.read_config()
    raw["train"]["epochs"] = cfg["train"]["epochs"] + 1
    atomic_write_json(a.config_path, raw)
    for argv in (["study", "show", "ed"], ["study", "resume", "ed"], ["study", "collect", "ed"]):
        line = one_line_error(*run_main(capsys, *argv)[::2])
        assert f"Run {a.run_id} (base seed 0 of study ed) was edited by hand" in line
        assert "train.epochs" in line
    raw["train"]["epochs"] = cfg["train"]["epochs"]
    atomic_write_json(a.config_path, raw)
    # a deleted member run
    shutil.rmtree(b.path)
    for argv in (["study", "show", "ed"], ["study", "resume", "ed"]):
        line = one_line_error(*run_main(capsys, *argv)[::2])
        assert f"Run {b.run_id} (base seed 1 of study ed) was deleted" in line
        assert "--rerun-deleted" in line
    from engine.errors import UserError
    from engine.studies import find_study, member_run_for

    with pytest.raises(UserError, match=f"Run {b.run_id} .* is gone"):  # mid-study: no new run
        member_run_for(find_study("ed"), study.member("base", 1))
    assert [p.name for p in (home / "runs").iterdir()] == [a.run_id]
    assert a.path.exists() and (home / "studies" / "ed" / "study.json").exists()
    code, out, _ = run_main(capsys, "studies", "--json")
    assert json.loads(out)[0]["state"] == "needs attention"


# ---------------------------------------------------------------- ETAs and devices


def test_rates_etas_and_gpu_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.study_runner import MemberProgress, RateTracker, gpu_slots, study_eta

    rates = RateTracker(window=100)
    for t, it in [(0, 0), (10, 5), (20, 10), (30, 10)]:
        rates.add("r", it, now=t)
    assert rates.rate("r", now=40) == pytest.approx(10 / 40)  # a stall counts until now
    rates.add("r", 3, now=50)  # resumed from an earlier checkpoint: start over
    assert rates.rate("r", now=51) is None
    members = [MemberProgress("a", 0, "x", "finished", 100, 100),
               MemberProgress("a", 1, "y", "running", 40, 100, rate=2.0),
               MemberProgress("b", 0, None, "queued", 0, 100),
               MemberProgress("b", 1, None, "queued", 0, 100)]
    assert study_eta(members, 1) == pytest.approx(260 / 2.0)
    assert study_eta(members, 2) == pytest.approx(260 / 4.0)
    assert study_eta(members, 2, rate=0.5) == pytest.approx(260 / 1.0)
    assert study_eta(members[:1], 1) == 0.0
    assert study_eta([MemberProgress("a", 0, None, "queued", 0, 9)], 1) is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert gpu_slots("auto", 3) == ["2", "3", "2"]
    assert gpu_slots("cuda:1", 2) == ["3", "3"]
    assert gpu_slots("cpu", 2) == [None, None]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_slots("auto", 2) == [None, None]


# ---------------------------------------------------------------- the study view


def test_study_view_shows_members_and_enter_opens_one(home: Path, capsys) -> None:
    from mamlpp_tui.dashboard import study_app
    from mamlpp_tui.dashboard.study_app import MemberDashboardApp, StudyApp

    study = make_study(capsys, "view", "ablate", *sets(), "--variants", "maml,+ca",
                       "--seeds", "0,1")
    done = tagged_run(study, "maml", 0)
    finish(done, 0.7234, [0.7, 0.69], 0.031, [0.6, 0.71], 1000.0, 12.0, [3.0])
    stopped = tagged_run(study, "maml", 1)
    stopped.write_status(state="stopped", iteration=5)

    def screen(app) -> str:
        return "\n".join(s.text for s in app.screen._compositor.render_strips())

    async def body(app, pilot, keys: list[str]) -> str:
        deadline = time.monotonic() + 10
        while app.view is None and time.monotonic() < deadline:
            await pilot.pause(0.05)
        await pilot.pause(0.2)
        text = screen(app)
        for key in keys:
            await pilot.press(key)
            await pilot.pause(0.1)
        return text

    def drive(keys: list[str], size=(100, 32), row: int = 0) -> tuple[Any, str]:
        app = StudyApp(study, poll_s=0.1, cursor_row=row)
        out: list[str] = []

        async def main() -> None:
            async with app.run_test(size=size) as pilot:
                out.append(await body(app, pilot, keys))

        asyncio.run(main())
        return app, out[0]

    app, text = drive(["down", "enter"])
    assert "ablate of quickstart" in text and "1 finished, 2 not started, 1 stopped" in text
    assert "72.34 ±3.10" in text and "5/12" in text  # result and progress of the members
    assert "maml seed 0: run " + done.run_id in text
    assert "results" in text and "72.34" in text.split("results")[1]
    assert app.return_value == (stopped.run_id, 1)
    app, text = drive(["enter"], size=(60, 32), row=2)  # +ca seed 0: no run yet
    assert app.return_value is None and "+ca seed 0: no run yet" in text
    for line in text.splitlines():
        assert len(line) <= 60
    # Escape in a member's dashboard comes back; q closes everything
    member = MemberDashboardApp(done.path, "view", local_sampling=False)

    async def escape() -> None:
        async with member.run_test(size=(120, 40)) as pilot:
            await pilot.pause(0.3)
            await pilot.press("escape")

    asyncio.run(escape())
    assert member.return_value == "back"
    script = iter([(done.run_id, 0), (stopped.run_id, 1), None])
    seen: list[Any] = []

    class FakeStudy:
        def __init__(self, study, cursor_row=0, **kw) -> None:
            seen.append(("study", cursor_row))

        def run(self):
            return next(script)

    class FakeMember:
        def __init__(self, run_dir, study_id, **kw) -> None:
            seen.append(("member", Path(run_dir).name))

        def run(self):
            return "back"

    orig = study_app.StudyApp, study_app.MemberDashboardApp
    study_app.StudyApp, study_app.MemberDashboardApp = FakeStudy, FakeMember
    try:
        study_app.run_study_dashboard(study)
    finally:
        study_app.StudyApp, study_app.MemberDashboardApp = orig
    assert seen == [("study", 0), ("member", done.run_id), ("study", 0),
                    ("member", stopped.run_id), ("study", 1)]


def test_watch_takes_runs_first_then_studies(home: Path, capsys, monkeypatch) -> None:
    import mamlpp_tui.dashboard as dashboard
    from mamlpp_tui.dashboard import study_app

    opened: list[str] = []
    monkeypatch.setattr(dashboard, "run_dashboard", lambda path: opened.append(Path(path).name))
    monkeypatch.setattr(study_app, "run_study_dashboard", lambda s: opened.append("study " + s.id))
    study = make_study(capsys, "wat", "sweep", *sets(), "--seeds", "0")
    run = tagged_run(study, "base", 0)  # its id starts with the study's
    for ref, want in [("wat", "study wat"), (run.run_id, run.run_id),
                      (run.run_id[:8], run.run_id)]:
        code, _, err = run_main(capsys, "watch", ref)
        assert code == 0, err
        assert opened.pop() == want
    make_study(capsys, "wa2", "sweep", *sets(), "--seeds", "0")
    code, _, err = run_main(capsys, "watch", "wa")  # a run and two studies
    assert "matches runs" in one_line_error(code, err) and not opened


# ---------------------------------------------------------------- real studies, end to end


@pytest.fixture(scope="module")
def quickstart_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart cache, generated once and shared (read-only) by every home below."""
    from engine.data import load_dataset

    shared = tmp_path_factory.mktemp("shared")
    old = os.environ.get("MAMLPP_HOME")
    os.environ["MAMLPP_HOME"] = str(shared)
    try:
        load_dataset("quickstart")
    finally:
        if old is None:
            del os.environ["MAMLPP_HOME"]
        else:
            os.environ["MAMLPP_HOME"] = old
    return shared / "data"


def new_home(path: Path, data: Path) -> Path:
    path.mkdir(parents=True)
    (path / "data").symlink_to(data)
    return path


def tagged(home: Path, study: str) -> dict[tuple[str, int], list[str]]:
    out: dict[tuple[str, int], list[str]] = {}
    for d in sorted((home / "runs").iterdir()) if (home / "runs").exists() else []:
        if not (d / "config.json").is_file():  # being created (config.json comes atomically)
            continue
        tag = json.loads((d / "config.json").read_text()).get("study")
        if tag and tag["id"] == study:
            out.setdefault((tag["variant"], tag["seed"]), []).append(d.name)
    return out


def table_of(study_id: str) -> dict:
    from engine.studies import find_study, member_runs
    from engine.study_results import study_table

    study = find_study(study_id)
    return study_table(study, member_runs(study, strict=True))


def popen(home: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "mamlpp_tui", *args], text=True,
                            env=dict(os.environ, MAMLPP_HOME=str(home)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)


def test_ablation_of_two_variants_with_two_jobs(tmp_path: Path, quickstart_data: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    home = new_home(tmp_path / "home", quickstart_data)
    proc = popen(home, "ablate", "quickstart", *sets(), "--variants", "maml,+ca", "--seeds", "0",
                 "--jobs", "2", "--name", "abl")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "study abl finished" in out
    runs = tagged(home, "abl")
    assert sorted(runs) == [("+ca", 0), ("maml", 0)] and all(len(v) == 1 for v in runs.values())
    monkeypatch.setenv("MAMLPP_HOME", str(home))
    table = table_of("abl")
    assert [row["variant"] for row in table["rows"]] == ["maml", "+ca"]
    spans = []
    for row in table["rows"]:
        (m,) = row["members"]
        d = home / "runs" / m["run"]
        assert m["state"] == "finished" and runs[row["variant"], 0] == [m["run"]]
        ens = json.loads((d / "ensemble.json").read_text())
        assert row["finished"] == 1 and row["test_accuracy_std"] is None
        assert row["test_accuracy_mean"] == m["test_accuracy"] == ens["accuracy"]
        assert m["ci95"] == ens["ci95"] and row["ci95"] == [ens["ci95"]]
        assert m["best_epoch_test_accuracy"] == max(ens["member_accuracies"])
        config = json.loads((d / "config.json").read_text())
        assert config["maml_pp"]["lslr"] is (row["variant"] == "+ca")
        assert config["study"] == {"id": "abl", "variant": row["variant"], "seed": 0}
        events, _ = read_events(d / "events.jsonl")
        times = [e["time"] for e in events if e["type"] == "state"]
        spans.append((min(times), max(times)))
    (a0, a1), (b0, b1) = spans  # two jobs: both members trained at the same time
    assert a0 < b1 and b0 < a1, spans


def test_dry_run_by_hand_then_collect_and_kill9_then_resume(
        tmp_path: Path, quickstart_data: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    home = new_home(tmp_path / "home", quickstart_data)
    cluster = new_home(tmp_path / "cluster", quickstart_data)
    monkeypatch.setenv("MAMLPP_HOME", str(home))
    code, out, err = run_main(capsys, "sweep", *sets(), "--seeds", "0,1", "--name", "hand",
                              "--dry-run")
    assert code == 0, err
    commands = out.splitlines()
    assert len(commands) == 2 and all(c.startswith("mamlpp run ") for c in commands)
    assert "collect hand" in err and not (home / "runs").exists()
    study = json.loads((home / "studies" / "hand" / "study.json").read_text())
    assert [shlex.join(["mamlpp", *m["args"]]) for m in study["members"]] == commands
    # the commands run by hand, both at once, on "another machine" (its own MAMLPP_HOME) ...
    hand = [popen(cluster, *shlex.split(c)[1:]) for c in commands]
    # ... while the study runs the same config (seed 0) here, and is killed mid-member
    runner = popen(home, "sweep", *sets(), "--seeds", "0", "--name", "killed")

    def member() -> dict:
        runs = tagged(home, "killed").get(("base", 0))
        return RunDir(home / "runs" / runs[0]).read_raw_status() if runs else {}

    assert wait_for(lambda: member().get("iteration", 0) >= 5 or runner.poll() is not None,
                    timeout=300, every=0.02)
    assert runner.poll() is None, runner.communicate()[0]
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    # the orphaned member checkpoints and stops at its next iteration by itself
    assert wait_for(lambda: member().get("state") == "stopped", timeout=120), member()
    assert 5 <= member()["iteration"] < 12
    for p in hand:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out
    # the hand-run members, carried here and collected
    (home / "runs").mkdir(exist_ok=True)
    for d in (cluster / "runs").iterdir():
        shutil.move(str(d), home / "runs" / d.name)
    code, out, err = run_main(capsys, "study", "collect", "hand", "--json")
    assert code == 0, err
    collected = json.loads(out)
    assert len(collected["collected"]) == 2 and collected["finished"] == 2
    assert len(list((home / "studies" / "hand" / "members").iterdir())) == 2
    (row,) = collected["rows"]  # a sweep of two seeds: mean and std of their ensemble.json
    accs = [json.loads((home / "runs" / m["run"] / "ensemble.json").read_text())["accuracy"]
            for m in row["members"]]
    assert row["test_accuracy_mean"] == pytest.approx(statistics.fmean(accs), abs=1e-12)
    assert row["test_accuracy_std"] == pytest.approx(statistics.stdev(accs), abs=1e-12)
    # resume: the member continues from its stop, in its one run
    code, out, err = run_main(capsys, "study", "resume", "killed")
    assert code == 0, out + err
    assert "base seed 0: resuming run" in out
    runs = tagged(home, "killed")
    assert list(runs) == [("base", 0)] and len(runs["base", 0]) == 1
    events, _ = read_events(home / "runs" / runs["base", 0][0] / "events.jsonl")
    reasons = [e["reason"] for e in events if e["type"] == "state"]
    assert reasons == ["started", "requested", "resumed", "all epochs done"], reasons
    # and ends bit-identical to the uninterrupted hand-run member of the same config
    a = final_tensors(home, runs["base", 0][0])
    b = final_tensors(home, tagged(home, "hand")["base", 0][0])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert table_of("killed")["rows"][0]["test_accuracy_mean"] == accs[0]
