"""`mamlpp report`, `mamlpp compare` and the TensorBoard / CSV exports, on real runs.

Two tiny quickstart runs are trained once for the module (they differ in exactly two keys);
a third run directory is the first one cut back to before its first validation, to stand for
a run that crashed (or is still running) early. Expected values are computed here from
events.jsonl and config.json directly, never through the report code.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tomllib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import run_main
from tests.run_fixtures import TINY, events, run_dir, sets, story

RUN_FIGURES = {"losses", "validation", "ensemble", "msl_weights", "meta_lr", "lslr_heatmap",
               "lslr_evolution"}
COMPARE_FIGURES = {"losses", "validation", "ensemble", "msl_weights", "meta_lr", "lslr_heatmap"}
STUDY = "st"
LRS = ("0.002", "0.003")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A sweep study of tiny runs, two meta learning rates x seeds 0 and 1, two at a time.

    alpha is its (meta_lr 0.002, seed 0) member and beta its (0.003, seed 1) one, so they
    differ in exactly train.meta_lr and train.seed. crash is alpha's directory, untagged and
    cut back to the events before its first validation, without checkpoints or ensemble: a
    run that crashed in its first epoch."""
    home = tmp_path_factory.mktemp("report-home")
    proc = subprocess.run(
        [sys.executable, "-m", "mamlpp_tui", "sweep", "quickstart", "--seeds", "0,1", "--grid",
         f"train.meta_lr={','.join(LRS)}", *sets(), "--name", STUDY, "--jobs", "2"],
        env=dict(os.environ, MAMLPP_HOME=str(home)), capture_output=True, text=True,
        timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = {}
    for name, lr, seed in (("alpha", LRS[0], 0), ("beta", LRS[1], 1), ("alpha1", LRS[0], 1),
                           ("beta0", LRS[1], 0)):
        prefix = f"{STUDY}-meta_lr-{lr}-s{seed}-"
        (rid,) = [p.name for p in (home / "runs").iterdir() if p.name.startswith(prefix)]
        assert json.loads((run_dir(home, rid) / "status.json").read_text())["state"] == \
            "finished", story(home, rid)
        ids[name] = rid
    a = run_dir(home, ids["alpha"])
    c = home / "runs" / ids["alpha"].replace(STUDY, "crash")
    c.mkdir()
    config = json.loads((a / "config.json").read_text())
    config.pop("study")
    (c / "config.json").write_text(json.dumps(config))
    lines = (a / "events.jsonl").read_text().splitlines(keepends=True)
    first_val = next(i for i, line in enumerate(lines) if json.loads(line)["type"] == "val")
    (c / "events.jsonl").write_text("".join(lines[:first_val]))
    (c / "checkpoints").mkdir()
    status = json.loads((a / "status.json").read_text())
    status.update(state="running", pid=2**22 + 12345, iteration=2, epoch=0)  # no such process
    (c / "status.json").write_text(json.dumps(status))
    ids["crash"] = c.name
    return home, ids


def run_cli(monkeypatch, capsys, home: Path, *argv: str,
            columns: int = 100) -> tuple[int, str, str]:
    monkeypatch.setenv("MAMLPP_HOME", str(home))
    monkeypatch.setenv("COLUMNS", str(columns))
    return run_main(capsys, *argv)


class _Refs(HTMLParser):
    """Every URL-ish attribute of a page, and the figures (img tags with their size)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.images: list[dict[str, str]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("src", "href", "srcset", "data", "action", "poster"):
            if attrs.get(key):
                self.urls.append(attrs[key])
        if tag == "img":
            self.images.append(attrs)
        if tag in ("script", "link", "iframe", "object", "embed"):
            self.urls.append(f"<{tag}>")  # none of these belong in a report page


def page_refs(index: Path) -> _Refs:
    parser = _Refs()
    parser.feed(index.read_text())
    return parser


def assert_self_contained(index: Path) -> _Refs:
    text = index.read_text()
    refs = page_refs(index)
    for url in refs.urls:
        assert not url.startswith("<"), f"{url} in {index}"
        assert "://" not in url and not url.startswith("//"), url
        assert "/" not in url and (index.parent / url).is_file(), f"{url} is not beside the page"
    assert "http://" not in text and "https://" not in text and "url(" not in text
    return refs


def assert_drawn(png: Path, size: tuple[int, int]) -> None:
    """A real picture: the declared size, grey-level variance well above an empty figure's
    frame and grid (about 560 at this size), and coloured data pixels (axes are grey)."""
    image = Image.open(png)
    assert image.size == size, png
    grey = np.asarray(image.convert("L"), dtype=float)
    assert grey.var() > 300, png
    hsv = np.asarray(image.convert("RGB").convert("HSV"), dtype=float)
    coloured = ((hsv[..., 1] > 80) & (hsv[..., 2] > 40)).mean()
    assert coloured > 0.002, f"{png}: {coloured:.4f} of its pixels carry data colours"


def figures_of(refs: _Refs, folder: Path) -> dict[str, tuple[int, int]]:
    found = {}
    for img in refs.images:
        name = img["src"].removesuffix(".png")
        assert img["src"].endswith(".png")
        assert (folder / f"{name}.svg").is_file(), name
        svg = (folder / f"{name}.svg").read_text()
        assert svg.lstrip().startswith("<?xml") and "<svg" in svg and len(svg) > 5000
        found[name] = (int(img["width"]), int(img["height"]))
    return found


# ---------------------------------------------------------------- independent expectations


def last_per_iteration(evs: list[dict], kind: str) -> list[dict]:
    by_it: dict[int, dict] = {}
    for e in evs:
        if e["type"] == kind:
            by_it[e["iteration"]] = e
    return [by_it[k] for k in sorted(by_it)]


def expected_scalars(evs: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(iteration, value)]}: the numbers of each event type, spelled out per type."""
    out: dict[str, list[tuple[int, float]]] = {}

    def put(tag: str, it: int, value) -> None:
        if value is not None:
            out.setdefault(tag, []).append((it, float(value)))

    for e in last_per_iteration(evs, "train"):
        it = e["iteration"]
        for key in ("loss", "accuracy", "meta_lr", "iters_per_sec", "data_wait_s"):
            put(f"train/{key}", it, e[key])
        put("train/second_order", it, 1.0 if e["second_order"] else 0.0)
        for i, v in enumerate(e["step_losses"]):
            put(f"train/step_loss/step_{i + 1}", it, v)
        for i, v in enumerate(e["msl_weights"]):
            put(f"train/msl_weight/step_{i + 1}", it, v)
    for e in last_per_iteration(evs, "val"):
        for key in ("accuracy", "ci95", "loss", "tasks"):
            put(f"val/{key}", e["iteration"], e[key])
    for e in last_per_iteration(evs, "lslr"):
        for layer, rates in e["rates"].items():
            for i, v in enumerate(rates):
                put(f"lslr/rate/{layer}/step_{i + 1}", e["iteration"], v)
    for e in last_per_iteration(evs, "ensemble"):
        it = e["iteration"]
        for key in ("accuracy", "ci95", "tasks"):
            put(f"ensemble/{key}", it, e[key])
        for field, name in (("member_accuracies", "member_accuracy"),
                            ("member_ci95", "member_ci95"),
                            ("member_val_accuracies", "member_val_accuracy")):
            for epoch, v in zip(e["members"], e[field]):
                put(f"ensemble/{name}/epoch_{epoch}", it, v)
    for e in last_per_iteration(evs, "system"):
        for key in ("cpu_percent", "rss", "gpu_util", "gpu_mem_used", "gpu_mem_total"):
            put(f"system/{key}", e["iteration"], e[key])
    return out


# ---------------------------------------------------------------- run reports


@pytest.fixture(scope="module")
def alpha_report(home, tmp_path_factory):
    """Run A's report, written once through the command line."""
    root, ids = home
    out = tmp_path_factory.mktemp("alpha") / "report"
    env = dict(os.environ, MAMLPP_HOME=str(root), COLUMNS="200")
    proc = subprocess.run([sys.executable, "-m", "mamlpp_tui", "report", ids["alpha"], "--out",
                           str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"report of run {ids['alpha']}: {out / 'index.html'}"
    return out


def test_finished_run_report_has_every_figure_drawn(home, alpha_report):
    root, ids = home
    out = alpha_report
    refs = assert_self_contained(out / "index.html")
    figures = figures_of(refs, out)
    assert set(figures) == RUN_FIGURES
    for name, size in figures.items():
        assert_drawn(out / f"{name}.png", size)
    # the fixed-size figures are exactly their declared size (792 x 429 at 110 dpi)
    for name in ("losses", "validation", "msl_weights", "meta_lr"):
        assert figures[name] == (792, 429), name
    text = (out / "index.html").read_text()
    assert ids["alpha"] in text and "state-finished" in text
    assert 'class="note"' not in text


def test_report_header_lists_the_config_differences_from_the_preset(home):
    from mamlpp_tui.report.rundata import load_run

    root, ids = home
    preset = tomllib.loads(Path("presets/quickstart.toml").read_text())
    expected = {}
    for override in TINY:
        key, value = override.split("=")
        section, name = key.split(".")
        if preset[section][name] != tomllib.loads(f"v = {value}")["v"]:
            expected[key] = (preset[section][name], tomllib.loads(f"v = {value}")["v"])
    label, diff = load_run(run_dir(root, ids["alpha"])).config_diff()
    assert label == "preset quickstart"
    assert {k: (a, b) for k, a, b in diff} == expected


@pytest.mark.parametrize("state", ["failed", "running"])
def test_report_of_a_run_without_validation_omits_those_figures(home, alpha_report, monkeypatch,
                                                                capsys, tmp_path, state):
    """A run cut off in its first epoch, read as crashed (its pid is gone) and as live (this
    process holds its lock and is its pid). The crashed one's report is written over a copy of
    run A's, whose validation and ensemble pictures must then go."""
    from engine.run_store import RunDir

    root, ids = home
    run = RunDir(run_dir(root, ids["crash"]))
    out = tmp_path / "report"
    if state == "running":
        status = json.loads(run.status_path.read_text())
        run.status_path.write_text(json.dumps(dict(status, pid=os.getpid())))
        run.acquire_lock()
    else:
        shutil.copytree(alpha_report, out)
    try:
        code, _, err = run_cli(monkeypatch, capsys, root, "report", ids["crash"], "--out",
                               str(out))
    finally:
        run.release_lock()
    assert code == 0, err
    refs = assert_self_contained(out / "index.html")
    figures = figures_of(refs, out)
    assert set(figures) == {"losses", "msl_weights", "meta_lr", "lslr_heatmap"}
    for name, size in figures.items():
        assert_drawn(out / f"{name}.png", size)
    text = (out / "index.html").read_text()
    assert f"state-{state}" in text
    assert "No validation yet" in text and "No ensemble evaluation yet" in text
    assert "evolution shows after the first epoch" in text
    for name in ("validation", "ensemble", "lslr_evolution"):
        assert not (out / f"{name}.png").exists() and not (out / f"{name}.svg").exists()


def test_study_report_table_bars_and_member_curves(home, monkeypatch, capsys, tmp_path):
    root, ids = home
    out = tmp_path / "study"
    code, stdout, err = run_cli(monkeypatch, capsys, root, "report", STUDY, "--out", str(out),
                                columns=300)
    assert code == 0, err
    assert stdout.strip() == f"report of study {STUDY}: {out / 'index.html'}"
    refs = assert_self_contained(out / "index.html")
    figures = figures_of(refs, out)
    assert set(figures) == {"variants", "validation"}
    for name, size in figures.items():
        assert_drawn(out / f"{name}.png", size)
    text = (out / "index.html").read_text()
    members = {LRS[0]: (ids["alpha"], ids["alpha1"]), LRS[1]: (ids["beta0"], ids["beta"])}
    for lr, runs in members.items():
        accs = [json.loads((run_dir(root, rid) / "ensemble.json").read_text())["accuracy"]
                for rid in runs]
        mean, std = statistics.fmean(accs), statistics.stdev(accs)
        assert f"<td>meta_lr={lr}</td>" in text
        assert f"{100 * mean:.2f}% ± {100 * std:.2f}" in text  # over the two seeds
        for rid in runs:
            assert rid in text
    assert ids["crash"] not in text


# ---------------------------------------------------------------- exports


def test_tensorboard_export_reads_back_equal_to_the_events(home, tmp_path, monkeypatch,
                                                           capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mamlpp_tui.report.rundata import load_run
    from mamlpp_tui.report.tensorboard import export_tensorboard

    root, ids = home
    code, out, err = run_cli(monkeypatch, capsys, root, "export", ids["alpha"], "--tensorboard",
                             str(tmp_path / "tb"), columns=300)
    assert code == 0, err
    target = tmp_path / "tb" / ids["alpha"]
    assert f"to {target};" in out
    acc = EventAccumulator(str(target), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    expected = expected_scalars(events(root, ids["alpha"]))
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        got = [(s.step, s.value) for s in acc.Scalars(tag)]
        want = [(it, float(np.float32(v))) for it, v in points]  # TensorBoard keeps float32
        assert got == want, tag
    # the config as text
    (text,) = acc.Tensors("config/text_summary")
    markdown = text.tensor_proto.string_val[0].decode()
    assert "| train.meta_lr | `0.002` |" in markdown and "| model.filters | `32` |" in markdown
    # exporting again replaces the run's folder instead of doubling every point
    export_tensorboard(load_run(run_dir(root, ids["alpha"])), tmp_path / "tb")
    again = EventAccumulator(str(target), size_guidance={"scalars": 0})
    again.Reload()
    assert len(again.Scalars("train/loss")) == len(expected["train/loss"])


def test_tensorboard_missing_names_the_extra(home, tmp_path, monkeypatch):
    from engine.errors import UserError
    from mamlpp_tui.report.rundata import load_run
    from mamlpp_tui.report.tensorboard import export_tensorboard

    root, ids = home
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` fails
    with pytest.raises(UserError) as e:
        export_tensorboard(load_run(run_dir(root, ids["alpha"])), tmp_path / "tb")
    assert "pip install 'mamlpp[tensorboard]'" in str(e.value)
    assert str(e.value).count(".") <= 2 and "\n" not in str(e.value)


def test_csv_export_round_trips(home, tmp_path, monkeypatch, capsys):
    root, ids = home
    code, _, err = run_cli(monkeypatch, capsys, root, "export", ids["beta"], "--csv",
                           str(tmp_path / "csv"))
    assert code == 0, err
    target = tmp_path / "csv" / ids["beta"]
    with open(target / "scalars.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and {r["run"] for r in rows} == {ids["beta"]}
    got: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        tag = "/".join([r["type"], r["metric"]] + ([r["layer"]] if r["layer"] else [])
                       + ([f"step_{r['step']}"] if r["step"] else [])
                       + ([f"epoch_{r['member']}"] if r["member"] else []))
        got.setdefault(tag, []).append((int(r["iteration"]), float(r["value"])))
    evs = events(root, ids["beta"])
    assert got == expected_scalars(evs)  # exact: floats are written with repr
    by_it = {(e["type"], e["iteration"]): e for e in evs}
    for r in rows:
        e = by_it[(r["type"], int(r["iteration"]))]
        assert int(r["epoch"]) == e["epoch"] and float(r["time"]) == e["time"]
    with open(target / "config.csv", newline="") as f:
        config_rows = list(csv.DictReader(f))
    rebuilt: dict = {}
    for r in config_rows:
        *path, last = r["key"].split(".")
        node = rebuilt
        for part in path:
            node = node.setdefault(part, {})
        node[last] = json.loads(r["value"])
    assert rebuilt == json.loads((run_dir(root, ids["beta"]) / "config.json").read_text())


# ---------------------------------------------------------------- compare


def test_compare_lists_exactly_the_keys_that_differ(home, monkeypatch, capsys):
    root, ids = home
    code, out, err = run_cli(monkeypatch, capsys, root, "compare", ids["alpha"], ids["beta"],
                             "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["runs"] == [ids["alpha"], ids["beta"]]
    a = json.loads((run_dir(root, ids["alpha"]) / "config.json").read_text())
    b = json.loads((run_dir(root, ids["beta"]) / "config.json").read_text())
    assert result["differences"] == {"train.meta_lr": [0.002, 0.003], "train.seed": [0, 1]}
    assert (a["train"]["meta_lr"], b["train"]["seed"]) == (0.002, 1)
    ens = [json.loads((run_dir(root, i) / "ensemble.json").read_text())
           for i in (ids["alpha"], ids["beta"])]
    assert [r["ensemble_accuracy"] for r in result["results"]] == [e["accuracy"] for e in ens]


@pytest.mark.parametrize("columns", [80, 60])
def test_compare_in_the_terminal_keeps_ids_and_keys_whole(home, monkeypatch, capsys, columns):
    root, ids = home
    code, out, err = run_cli(monkeypatch, capsys, root, "compare", ids["alpha"], ids["beta"],
                             columns=columns)
    assert code == 0, err
    assert max(len(line) for line in out.splitlines()) <= columns
    assert ids["alpha"] in out and ids["beta"] in out and "…" not in out
    assert "train.meta_lr" in out and "train.seed" in out
    assert "model.filters" not in out  # the same in both runs


def test_compare_report_overlays_both_runs(home, monkeypatch, capsys, tmp_path):
    root, ids = home
    out = tmp_path / "cmp"
    code, _, err = run_cli(monkeypatch, capsys, root, "compare", ids["alpha"], ids["beta"],
                           ids["crash"], "--out", str(out))
    assert code == 0, err
    refs = assert_self_contained(out / "index.html")
    figures = figures_of(refs, out)
    assert set(figures) == COMPARE_FIGURES
    for name, size in figures.items():
        assert_drawn(out / f"{name}.png", size)
    text = (out / "index.html").read_text()
    for name in ("alpha", "beta", "crash"):
        assert ids[name] in text
    assert f"Without validation: {ids['crash']}" in text


@pytest.mark.parametrize("argv, needle", [
    (["compare", "{alpha}"], "at least two runs"),
    (["compare", "{alpha}", "{alpha}"], "given twice"),
    (["compare", "{alpha}", "{beta}", "--open"], "--out"),
    (["compare", "{alpha}", STUDY], "ambiguous"),  # the study's id prefixes all four members
    (["report", "nosuchrun"], "No run or study matches"),
    (["export", "{alpha}", "--csv", "x", "--tensorboard", "y"], "Give exactly one of --to"),
    (["export", "{alpha}"], "Give exactly one of --to"),
    (["export", "{alpha}", "--csv", "x", "--members", "best"], "--members goes with --to"),
])
def test_report_and_compare_usage_errors(home, monkeypatch, capsys, argv, needle):
    root, ids = home
    code, out, err = run_cli(monkeypatch, capsys, root, *(a.format(**ids) for a in argv))
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------- pieces


def test_one_per_iteration_keeps_the_newest_copy_after_a_resume():
    from mamlpp_tui.report.rundata import one_per_iteration

    evs = [{"type": "train", "iteration": i, "v": "old"} for i in (1, 2, 3, 4, 5)]
    evs += [{"type": "val", "iteration": 4, "v": "old"}]
    # killed after 5, resumed from a checkpoint at 2: iterations 3.. are redone
    evs += [{"type": "train", "iteration": i, "v": "new"} for i in (3, 4)]
    series = one_per_iteration(evs)
    assert [(e["iteration"], e["v"]) for e in series["train"]] == \
        [(1, "old"), (2, "old"), (3, "new"), (4, "new")]
    assert [e["iteration"] for e in series["val"]] == [4]


def test_wall_time_counts_running_engine_sessions(home, tmp_path):
    """The header's wall time is the studies' measure: running periods only (a pause, a kill
    and a later `mamlpp ensemble` left out)."""
    from mamlpp_tui.report.rundata import load_run

    root, ids = home
    run = tmp_path / "run"
    shutil.copytree(run_dir(root, ids["alpha"]), run)

    def ev(t, kind="train", **kw):
        return {"type": kind, "time": t, "iteration": 1, "epoch": 0, "iters_per_sec": 2.0, **kw}

    evs = [ev(0, "state", state="running", reason="started"), ev(4), ev(10),
           # killed: no closing state event; resumed 90 s later
           ev(100, "state", state="running", reason="resumed"),
           ev(110, "state", state="paused", reason="requested"),
           ev(150, "state", state="running", reason="unpaused"),
           ev(160, "state", state="finished", reason="all epochs done"),
           ev(500, "ensemble")]
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evs))
    data = load_run(run)
    assert data.wall_time() == 10 + 10 + 10
    assert data.iters_per_sec() == 2.0
