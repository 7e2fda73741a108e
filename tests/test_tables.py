"""Every table a command prints, rendered through the real entry point at 60, 80 and 120
columns: the names that identify a row (preset names, run ids, states, datasets, ensemble
members) appear whole, nothing is cut to `…`, no line is wider than the terminal, and dropped
columns are named.

A new table-printing command is covered by one line in COMMANDS: its arguments and the names
that must appear whole, taken from the `world` fixture (add to it what the command needs)."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

from engine import checkpoints as ckpt
from engine.config import resolve
from engine.data.cache import CacheWriter
from engine.data.splits import RAVI_TEST, RAVI_VAL
from engine.presets import preset_names
from engine.run_store import RunDir, create_run
from mamlpp_tui.tables import Column, fitted_table

WIDTHS = (60, 80, 120)


@dataclass
class World:
    home: Path
    runs: dict[str, str] = field(default_factory=dict)  # run id -> its state
    finished: str = ""
    ensemble: dict[str, Any] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    prediction: Any = None  # engine.adapt.Prediction that `predict` prints
    bench: dict[str, Any] = field(default_factory=dict)  # a report `bench` prints
    study: str = ""


@dataclass(frozen=True)
class MayFold:
    """A name that is long by nature (a file path): whole at 80 columns and more; at 60 it
    may fold over lines when the identifying columns alone are wider (never cut to `…`)."""

    text: str


# One line per table-printing command: (arguments, names that must appear whole) from World.
COMMANDS = {
    "presets": lambda w: (["presets"], list(preset_names())),
    "runs": lambda w: (["runs"], [*w.runs, *w.runs.values()]),
    "show": lambda w: (["show", w.finished], [w.finished, "finished", "validation"]),
    "show paused": lambda w: (["show", _id(w, "paused")], [_id(w, "paused"), "paused"]),
    "data info": lambda w: (["data", "info"], [*w.datasets, "train", "val", "test"]),
    "ensemble": lambda w: (["ensemble", w.finished],
                           [*(f"epoch {e}" for e in w.ensemble["members"]), "ensemble"]),
    "compare": lambda w: (["compare", w.finished, _id(w, "stopped")],
                          [w.finished, _id(w, "stopped"), "finished", "stopped"]),
    "predict": lambda w: (["predict", w.finished, "--support", "s", "--query", "q"],
                          [*map(MayFold, w.prediction.paths), *w.prediction.predicted]),
    "ablate --list": lambda w: (["ablate", "omniglot-5w1s", "--list"],
                                ["maml", "+bnrs+bnwb", "+lslr", "+msl", "+da", "+ca",
                                 "maml_pp.bn_per_step_affine", "maml_pp.first_order_epochs"]),
    "bench": lambda w: (["bench", "--preset", "paper"],
                        [*(r["preset"] for r in w.bench["rows"]), "auto", "plain", "first",
                         "second", "miniimagenet-5w5s plain second order failed: out of memory"]),
    "studies": lambda w: (["studies"], [w.study, "incomplete"]),
    "study show": lambda w: (["study", "show", w.study],
                             ["maml", "+bnrs+bnwb", "1/2: 1 stopped", "0/2: 2 not started"]),
}


WIDER_THAN_120 = {"presets", "predict", "bench"}  # their full tables need more than 120 columns


def _id(w: World, state: str) -> str:
    return next(r for r, s in w.runs.items() if s == state)


def _run(config: dict, name: str | None, state: str, history: list[dict] | None = None
         ) -> RunDir:
    run = create_run(config, name)
    run.write_status(state=state, pid=os.getpid() if state in ("running", "paused") else None,
                     iteration=1234, epoch=2, error="CUDA out of memory while adapting task 17"
                     if state == "failed" else None)
    if state in ("running", "paused"):
        run.acquire_lock()  # this process plays the engine, so the state stands
    for h in history or []:
        name = ckpt.epoch_name(h["epoch"])
        ckpt.save_checkpoint(run.checkpoints_dir, name, {"w": torch.zeros(1)},
                             {"iteration": 500 * (h["epoch"] + 1), "epoch": h["epoch"],
                              "val_accuracy": h["accuracy"], "history": history})
    return run


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    home = tmp_path_factory.mktemp("tables")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MAMLPP_HOME", str(home))
        w = World(home)
        mini = resolve("miniimagenet-5w5s").to_dict()
        omni = resolve("omniglot-20w1s").to_dict()
        history = [{"epoch": e, "accuracy": 0.6 + e / 100, "ci95": 0.0071, "loss": 1.0,
                    "tasks": 600} for e in range(12)]
        finished = _run(mini, None, "finished", history)
        w.ensemble = {"members": [11, 10, 9], "member_accuracies": [0.6712, 0.6698, 0.6655],
                      "member_ci95": [0.0071, 0.0072, 0.0073],
                      "member_val_accuracies": [0.71, 0.70, 0.69], "accuracy": 0.6832,
                      "ci95": 0.0044, "tasks": 600}
        finished.write_ensemble(w.ensemble)
        w.finished = finished.run_id
        held = []
        for config, name, state in ((mini, "big-batch", "running"), (omni, None, "paused"),
                                    (omni, "lr-sweep-a", "stopped"), (mini, None, "failed")):
            run = _run(config, name, state)
            held += [run] if state in ("running", "paused") else []
        from engine.run_store import list_runs
        w.runs = {r.run_id: r.read_status()["state"] for r in list_runs()}
        assert set(w.runs.values()) == {"finished", "running", "paused", "stopped", "failed"}
        _cache(home / "data", "omniglot", {"train": 30, "val": 6, "test": 7}, (1, 28, 28),
               {"method": "reference", "description": "the split of the reference "
                "implementation"})
        names = {"train": [f"n9{i:07d}" for i in range(64)], "val": RAVI_VAL, "test": RAVI_TEST}
        _cache(home / "data", "miniimagenet", {s: len(v) for s, v in names.items()},
               (3, 8, 8), None, names)
        w.datasets = ["omniglot", "miniimagenet"]
        w.prediction = _prediction()
        w.bench = _bench_report()
        from engine.config import from_dict
        from engine.studies import create_study, create_tagged_run, plan_ablation

        study, _ = create_study(plan_ablation("omniglot-20w1s", None, [], [0, 1],
                                              ["maml", "+bnrs+bnwb"]), "ladder-omniglot-20w1s")
        w.study = study.id
        for seed, state in ((0, "finished"), (1, "stopped")):
            run = create_tagged_run(study.id, "maml",
                                    from_dict(study.member("maml", seed).config))
            run.write_status(state=state, iteration=50000 if seed == 0 else 1234)
            if seed == 0:
                run.write_ensemble(w.ensemble)
        yield w
        for run in held:
            run.release_lock()


def _cache(root: Path, name: str, sizes: dict[str, int], shape: tuple[int, int, int],
           class_split: dict | None, names: dict[str, list[str]] | None = None) -> None:
    with CacheWriter(name, {s: (n, 2) for s, n in sizes.items()}, shape, root) as writer:
        fields: dict[str, Any] = {"source": {"kind": "local"},
                                  "class_names": names or {s: [f"{s}{i}" for i in range(n)]
                                                           for s, n in sizes.items()}}
        if class_split:
            fields["class_split"] = class_split
        writer.commit(fields)


def _prediction():
    """What `predict` prints a table of: five bird classes, six queries in class folders."""
    from engine.adapt import Member, Prediction

    classes = ["barn_owl", "snowy_owl", "great_horned_owl", "kestrel", "red_kite"]
    picks = [0, 1, 2, 3, 4, 2]
    probabilities = torch.full((6, 5), 0.05)
    probabilities[range(6), picks] = 0.8
    return Prediction(classes, [f"queries/{classes[c]}/IMG_2024061{i}_0001.jpg"
                                for i, c in enumerate(picks)],
                      [classes[c] for c in picks], probabilities, probabilities.log(),
                      [Member("epoch-0011", 11, 0.71, {})], "best", 5,
                      {"predict": 0.2, "read": 0.1}, [])


def _bench_report() -> dict[str, Any]:
    """What `engine.bench.run_bench` returns for the six paper presets, auto and plain, first
    and second order (one phase failed)."""
    rows = []
    for preset in [p for p in preset_names() if p != "quickstart"]:
        for impl in ("auto", "plain"):
            for order in ("first", "second"):
                rows.append({"preset": preset, "impl": impl, "order": order,
                             "s_per_iter": 6.923, "cpu_s_per_iter": 12.51,
                             "gflops_per_iter": 1234.5, "matmul_fraction": 0.314,
                             "data_wait_fraction": 0.0012, "cuda_peak_gib": None,
                             "train_peak_rss_gib": 2.24, "eval_tasks_per_s": 2.2,
                             "eval_peak_rss_gib": 1.14})
    rows[-1] = {"preset": "miniimagenet-5w5s", "impl": "plain", "order": "second",
                "error": "out of memory"}
    return {"device": {"device": "cpu", "cpu_model": "Intel(R) Xeon(R) CPU @ 2.20GHz"},
            "rows": rows, "targets": {"presets": {}}}


def _render(w: World, argv: list[str], width: int, monkeypatch, capsys) -> str:
    from mamlpp_tui import cli

    monkeypatch.setenv("MAMLPP_HOME", str(w.home))
    monkeypatch.setenv("COLUMNS", str(width))  # rich reads it, as in a terminal that wide
    monkeypatch.setattr("engine.trainer.run_ensemble", lambda *a, **k: w.ensemble)
    monkeypatch.setattr("engine.adapt.load", lambda *a, **k: None)  # predict's computation
    monkeypatch.setattr("engine.adapt.predict_folders", lambda *a, **k: w.prediction)
    monkeypatch.setattr("engine.bench.run_bench", lambda *a, **k: w.bench)  # its measuring
    try:
        cli.main(argv)
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err
    return capsys.readouterr().out


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_tables_keep_names_whole(world, command, width, monkeypatch, capsys):
    argv, names = COMMANDS[command](world)
    out = _render(world, argv, width, monkeypatch, capsys)
    assert Console(width=width).width == width
    for name in names:
        if isinstance(name, MayFold):
            name = name.text if width >= 80 else name.text[:20]
        assert name in out, f"{name!r} not whole in `mamlpp {' '.join(argv)}` at {width}:\n{out}"
    assert "…" not in out, out
    too_wide = [line for line in out.splitlines() if len(line) > width]
    assert not too_wide, out
    if width == 120 and command not in WIDER_THAN_120:
        assert "not shown" not in out, out  # at 120 columns every column fits


def test_runs_at_60_columns_show_id_and_state_and_name_what_is_hidden(world, monkeypatch,
                                                                      capsys):
    out = _render(world, ["runs"], 60, monkeypatch, capsys)
    flat = " ".join(out.split())
    assert "not shown:" in flat and "--json shows all" in flat
    for run_id, state in world.runs.items():
        row = next(line for line in out.splitlines() if run_id in line)
        assert state in row  # the state stays on the run's own line


def test_fitted_table_drops_the_lowest_priority_first_and_folds_only_when_it_must():
    def render(table, width: int) -> str:
        console = Console(width=width, record=True, file=open(os.devnull, "w"))
        console.print(table)
        return console.export_text()

    columns = [Column("id", identifying=True), Column("a", priority=2), Column("b", priority=1),
               Column("c", priority=2), Column("note", wrap=True, priority=3, min_width=8)]
    rows = [["run-" + "x" * 30, "1" * 10, "2" * 10, "3" * 10, "some words to wrap here"]]
    # id 34 + a, b, c 10 each + note >= 8, plus 3 characters per column and 1
    assert "not shown" not in render(fitted_table(columns, rows, 100), 100)
    out = render(fitted_table(columns, rows, 76), 76)  # 34 + 30 + 8 + 16 = 88 > 76: drop b
    assert "not shown: b (" in out and "2222222222" not in out and "3333333333" in out
    out = render(fitted_table(columns, rows, 64), 64)  # then c (the rightmost of a and c)
    assert "not shown: b, c (" in out and "1111111111" in out
    out = render(fitted_table(columns, rows, 40), 40)  # the id alone: 34 + 4
    assert "run-" + "x" * 30 in out and "not shown: a, b, c, note" in " ".join(out.split())
    out = render(fitted_table(columns, rows, 30), 30)  # narrower than the id: folded, whole
    assert "…" not in out and "".join(
        line.strip("│┃ ") for line in out.splitlines()).count("x") == 30
    # two identifying columns too wide together: the wider folds, the other stays whole
    columns = [Column("path", identifying=True), Column("class", identifying=True)]
    rows = [["queries/" + "y" * 40 + ".jpg", "great_horned_owl"]]
    out = render(fitted_table(columns, rows, 50), 50)
    assert "great_horned_owl" in out and "…" not in out
    assert "".join(line.split("│")[1].strip() for line in out.splitlines()
                   if line.startswith("│")) == rows[0][0]


BOX_DRAWING = re.compile("[\u2500-\u257f]")


def test_engine_log_and_dashboard_log_are_sentences_not_tables(tmp_path, monkeypatch):
    """The ensemble reaches engine.log (the training engine) and ensemble.log (the dashboard's
    `e`, its exact command with its output in that file, as the dashboard runs it) as plain
    sentences, one per member and one for the ensemble; the dashboard's log shows no table."""
    from engine.trainer import Trainer
    from mamlpp_tui.dashboard.app import DashboardApp
    from mamlpp_tui.dashboard.reader import RunWatcher
    monkeypatch.setenv("MAMLPP_HOME", str(tmp_path))
    small = ["train.epochs=2", "train.iters_per_epoch=1", "train.meta_batch=2",
             "model.filters=8", "train.inner_steps=1", "train.eval_inner_steps=1",
             "eval.val_tasks=4", "eval.test_tasks=4", "eval.ensemble_top_k=2"]
    run = create_run(resolve("quickstart", overrides=small).to_dict(), "log")
    assert Trainer(run, "cpu").train() == "finished"
    command = DashboardApp(run.path, local_sampling=False).ensemble_command()
    with open(run.path / "ensemble.log", "ab") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=300)
    logs = {name: (run.path / name).read_text() for name in ("engine.log", "ensemble.log")}
    assert done.returncode == 0, logs["ensemble.log"]
    members = run.read_ensemble()["members"]
    for name, text in logs.items():
        assert not BOX_DRAWING.search(text), f"{name}:\n{text}"
        for epoch in members:
            assert sum(f"ensemble member epoch {epoch} " in line
                       for line in text.splitlines()) == 1, f"{name}:\n{text}"
        assert sum("ensemble of epochs" in line for line in text.splitlines()) == 1, text
    shown = [line.text for line in RunWatcher(run.path, local_sampling=False).poll().new_log]
    assert not [t for t in shown if BOX_DRAWING.search(t)], shown
    for epoch in members:  # once from engine.log, once from ensemble.log
        assert sum(t.startswith(f"ensemble member epoch {epoch} ") for t in shown) == 2, shown
