"""Your own task on a trained model, end to end: a folder dataset of real images (mixed
formats and sizes) is imported and trained on for a few iterations; `mamlpp predict` adapts on
held-out classes; the same test task through `predict` and through `mamlpp ensemble` gives the
same logits bit for bit; an export loaded in a fresh process gives the same probabilities; the
README's Python example runs; bad input is one sentence and exit 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from engine.data import load_dataset, sampler_for
from engine.data.folder import import_folder, split_by_fractions
from mamlpp_tui import cli
from tests.own_data_fixtures import grey_characters_folder, needs_images, save
from tests.run_fixtures import mamlpp, sets

pytestmark = needs_images
REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(home, source folder, run id): 32 classes imported at 28x28 grayscale, one train class
    cut to 4 images (left out of 6-image tasks), a tiny run of 5-way 1-shot 5-query tasks."""
    base = tmp_path_factory.mktemp("own")
    home, src = base / "home", base / "glyphs"
    names = grey_characters_folder(src)
    small = split_by_fractions(names, (0.64, 0.16, 0.20), 0)["train"][0]
    for f in sorted((src / small).iterdir())[4:]:
        f.unlink()
    (src / names[0] / "README.txt").write_text("not an image")
    dataset = import_folder(src, "glyphs", size=28, channels=1, root=home / "data")
    assert dataset.manifest["skipped_files"] == 1
    r = mamlpp(home, "run", "--no-tui", "--name", "my-run", *sets(
        "data.dataset=glyphs", "data.queries=5", "train.epochs=3", "train.iters_per_epoch=3"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{small} (4)" in r.stderr and "left out of its tasks" in r.stderr
    run_id = next(p.name for p in (home / "runs").iterdir())
    return home, src, run_id


def _main(home: Path, argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setenv("MAMLPP_HOME", str(home))
    code = 0
    try:
        cli.main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def _test_classes(home: Path) -> list[str]:
    manifest = json.loads((home / "data" / "glyphs" / "manifest.json").read_text())
    return manifest["splits"]["test"]["class_names"]


def _held_out_task(tmp: Path, src: Path, classes: list[str], shots: int = 1) -> tuple[Path, Path]:
    """support/<class>/ with the first `shots` source files, queries/<class>/ with 4 more."""
    for name in classes:
        files = sorted(p for p in (src / name).iterdir() if p.suffix != ".txt")
        for f in files[:shots]:
            save(Image.open(f), tmp / "support" / name / f.name)
        for f in files[shots:shots + 4]:
            save(Image.open(f), tmp / "queries" / name / f.name)
    return tmp / "support", tmp / "queries"


def test_predict_on_held_out_classes(trained, tmp_path, monkeypatch, capsys):
    home, src, run_id = trained
    classes = _test_classes(home)[:5]
    support, queries = _held_out_task(tmp_path, src, classes)
    code, out, err = _main(home, ["predict", run_id, "--support", str(support), "--query",
                                  str(queries), "--json"], monkeypatch, capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["classes"] == sorted(classes)
    preds = result["predictions"]
    assert len(preds) == 20 and result["labelled"] == 20
    for p in preds:
        probs = p["probabilities"]
        assert list(probs) == result["classes"]
        assert abs(sum(probs.values()) - 1) < 1e-5
        assert p["predicted"] == max(probs, key=probs.get)
        assert p["label"] == Path(p["path"]).parent.name
    correct = sum(p["predicted"] == p["label"] for p in preds)
    assert result["accuracy"] == pytest.approx(correct / 20)
    assert result["member_choice"] == "ensemble" and len(result["members"]) == 3
    # the table and CSV forms say the same
    code, out, _ = _main(home, ["predict", run_id, "--support", str(support), "--query",
                                str(queries), "--csv"], monkeypatch, capsys)
    rows = [line.split(",") for line in out.strip().splitlines()]
    assert rows[0] == ["path", "predicted", "label", *sorted(classes)]
    assert [r[1] for r in rows[1:]] == [p["predicted"] for p in preds]
    code, out, _ = _main(home, ["predict", run_id, "--support", str(support), "--query",
                                str(queries)], monkeypatch, capsys)
    assert code == 0 and f"accuracy {100 * correct / 20:.2f}% ({correct} of 20" in out
    assert "queries predicted in" in out


def test_predict_reproduces_the_ensemble_logits_exactly(trained, tmp_path, monkeypatch, capsys):
    """Test task t of the run's ensemble, written out as PNG files, through `mamlpp predict`:
    the averaged logits equal `mamlpp ensemble`'s (ensemble-logits.safetensors) exactly."""
    home, _, run_id = trained
    monkeypatch.setenv("MAMLPP_HOME", str(home))
    from engine.run_store import find_run
    from engine.trainer import run_config

    run = find_run(run_id)
    config = run_config(run)
    saved = load_file(run.path / "ensemble-logits.safetensors")
    sampler = sampler_for(config, "test", load_dataset("glyphs"))
    names = sampler.dataset.class_names["test"]
    for t in (0, 7):
        raw = sampler.raw_batch(t, 1)
        classes, _, _ = sampler.task_indices(t)
        folders = [f"{i}_{names[c]}" for i, c in enumerate(classes.tolist())]
        task = tmp_path / f"task{t}"
        for k, (x, y) in enumerate(zip(raw.x_support[0], raw.y_support[0].tolist())):
            save(Image.fromarray(x[0].numpy()), task / "support" / folders[y] / f"s{k}.png")
        for k, (x, y) in enumerate(zip(raw.x_query[0], raw.y_query[0].tolist())):
            save(Image.fromarray(x[0].numpy()), task / "query" / folders[y] / f"q{k:03d}.png")
        code, out, err = _main(home, ["predict", run_id, "--support", str(task / "support"),
                                      "--query", str(task / "query"), "--json"],
                               monkeypatch, capsys)
        assert code == 0, err
        result = json.loads(out)
        logits = torch.tensor([p["logits"] for p in result["predictions"]], dtype=torch.float32)
        want = saved["member_logits"][:, t].mean(0)
        assert torch.equal(logits, want), (logits - want).abs().max()
        labels = saved["labels"][t]
        assert result["accuracy"] == pytest.approx(
            (want.argmax(-1) == labels).double().mean().item())
        assert [m["epoch"] for m in result["members"]] == \
            json.loads((run.path / "ensemble.json").read_text())["members"]


def test_export_then_load_in_a_fresh_process(trained, tmp_path, monkeypatch, capsys):
    home, src, run_id = trained
    support, queries = _held_out_task(tmp_path, src, _test_classes(home)[2:7], shots=2)
    out_dir = tmp_path / "exported"
    code, out, err = _main(home, ["export", run_id, "--to", str(out_dir)], monkeypatch, capsys)
    assert code == 0, err
    manifest = json.loads((out_dir / "model.json").read_text())
    assert set(manifest["files"]) == {"README.md", *(m["file"] for m in manifest["members"])}
    card = (out_dir / "README.md").read_text()
    ensemble = json.loads((home / "runs" / run_id / "ensemble.json").read_text())
    assert f"{100 * ensemble['accuracy']:.2f}%" in card and "28x28" in card
    assert manifest["input"]["normalize"]["mean"] == \
        json.loads((home / "data" / "glyphs" / "manifest.json").read_text())["normalize"]["mean"]
    # the run (in this process) and the export (in a fresh one, without the data cache or the
    # run) give the same probabilities
    import mamlpp

    files = sorted(support.glob("*/*"))
    qfiles = sorted(queries.glob("*/*"))
    adapted = mamlpp.load(str(home / "runs" / run_id)).adapt(
        [Image.open(p) for p in files], [p.parent.name for p in files])
    probs = adapted.predict_proba([Image.open(p) for p in qfiles])
    script = (
        "import json, sys, mamlpp\n"
        "from pathlib import Path\n"
        "from PIL import Image\n"
        "s = sorted(Path(sys.argv[2]).glob('*/*')); q = sorted(Path(sys.argv[3]).glob('*/*'))\n"
        "a = mamlpp.load(sys.argv[1]).adapt([Image.open(p) for p in s], [p.parent.name for p "
        "in s])\n"
        "print(json.dumps({'classes': a.classes, 'p': a.predict_proba([Image.open(p) for p in "
        "q]).tolist()}))\n")
    env = dict(os.environ, MAMLPP_HOME=str(tmp_path / "elsewhere"))
    proc = subprocess.run([sys.executable, "-c", script, str(out_dir), str(support),
                           str(queries)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr
    fresh = json.loads(proc.stdout)
    assert fresh["classes"] == adapted.classes
    assert torch.equal(torch.tensor(fresh["p"], dtype=torch.float32), probs)
    # `predict` takes the export alone too
    monkeypatch.setenv("MAMLPP_HOME", str(tmp_path / "elsewhere"))
    code, out, err = _main(tmp_path / "elsewhere", ["predict", str(out_dir), "--support",
                                                    str(support), "--query", str(queries),
                                                    "--json"], monkeypatch, capsys)
    assert code == 0, err
    assert [list(p["probabilities"].values()) for p in json.loads(out)["predictions"]] == \
        probs.tolist()
    # --members best: one network, the best validation epoch
    best = tmp_path / "best"
    code, _, err = _main(home, ["export", run_id, "--to", str(best), "--members", "best"],
                         monkeypatch, capsys)
    assert code == 0, err
    members = json.loads((best / "model.json").read_text())["members"]
    assert [m["epoch"] for m in members] == [ensemble["members"][0]]


def test_bad_input_is_one_sentence_and_exit_2(trained, tmp_path, monkeypatch, capsys):
    home, src, run_id = trained
    classes = _test_classes(home)[:5]
    support, queries = _held_out_task(tmp_path, src, classes)
    export = tmp_path / "export"
    assert _main(home, ["export", run_id, "--to", str(export)], monkeypatch, capsys)[0] == 0

    def fails(argv: list[str], needle: str) -> None:
        code, out, err = _main(home, argv, monkeypatch, capsys)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
        assert needle in err, err

    pq = ["--support", str(support), "--query", str(queries)]
    # an export whose member file was modified
    member = next((export / "members").iterdir())
    data = bytearray(member.read_bytes())
    data[-5] ^= 0xFF
    member.write_bytes(bytes(data))
    fails(["predict", str(export), *pq], "sha256 mismatch")
    member.write_bytes(bytes(data[:-100]))
    fails(["predict", str(export), *pq], "sha256 mismatch")
    # a folder that is not an export, a missing run, a run without checkpoints
    (tmp_path / "plain").mkdir()
    fails(["predict", str(tmp_path / "plain"), *pq], "neither a mamlpp export")
    fails(["predict", "nosuchrun", *pq], "No run matches")
    monkeypatch.setenv("MAMLPP_HOME", str(home))
    from engine.config import resolve
    from engine.run_store import create_run

    empty = create_run(resolve("quickstart").to_dict(), "empty").run_id
    fails(["predict", empty, *pq], "has no checkpoint yet")
    fails(["export", empty, "--to", str(tmp_path / "e2")], "has no checkpoint yet")
    fails(["export", run_id, "--to", str(export)], "not an empty folder")
    fails(["export", run_id], "Give exactly one of --to")
    # a support class without images, or with unreadable ones only; too many classes
    (support / "zzz_empty").mkdir()
    fails(["predict", run_id, *pq], "zzz_empty")
    (support / "zzz_empty" / "x.png").write_text("not a png")
    fails(["predict", run_id, *pq], "has no readable images")
    (support / "zzz_empty" / "x.png").unlink()
    (support / "zzz_empty").rmdir()
    extra = tmp_path / "six"
    for i, name in enumerate(_test_classes(home)[:6]):
        f = next(p for p in sorted((src / name).iterdir()) if p.suffix != ".txt")
        save(Image.open(f), extra / f"{i}{name}" / f.name)
    fails(["predict", run_id, "--support", str(extra), "--query", str(queries)], "5-way")
    fails(["predict", run_id, "--support", str(support), "--query", str(tmp_path / "none")],
          "does not exist")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_bytes(b"\xff\xd8\xff garbage")
    fails(["predict", run_id, "--support", str(support), "--query", str(junk)],
          "None of the 1 query files")
    fails(["predict", run_id, *pq, "--json", "--csv"], "not both")
    # unreadable queries among good ones are skipped and counted; colour is converted, said
    colour = tmp_path / "colour"
    save(Image.open(next(queries.glob("*/*"))).convert("RGB"), colour / "rgb.png")
    (colour / "notes.txt").write_text("hello")
    code, out, err = _main(home, ["predict", run_id, "--support", str(support), "--query",
                                  str(colour), "--json"], monkeypatch, capsys)
    assert code == 0, err
    assert "skipped 1 unreadable or non-image query file" in err
    assert "converted 1 query image to grayscale" in err
    assert len(json.loads(out)["predictions"]) == 1 and json.loads(out)["accuracy"] is None


def test_fewer_classes_than_ways_and_more_queries_than_a_query_set(trained, monkeypatch):
    home, _, run_id = trained
    monkeypatch.setenv("MAMLPP_HOME", str(home))
    import mamlpp

    model = mamlpp.load(run_id, members="best")
    assert len(model.members) == 1
    ds = load_dataset("glyphs")
    test = ds.splits["test"]
    counts = ds.class_counts.get("test")
    first = (lambda c, i: test[c, i]) if counts is None else \
        (lambda c, i: test[int(np.sum(counts[:c])) + i])
    support = [first(c, 0) for c in range(3)]
    adapted = model.adapt(support, ["a", "b", "c"])
    assert "3 classes on a 5-way model" in adapted.notes[0]
    queries = torch.stack([first(c, i) for c in range(3) for i in range(1, 13)])
    probs = adapted.predict_proba(queries)
    assert probs.shape == (36, 3) and torch.allclose(probs.sum(-1), torch.ones(36))
    assert adapted.max_query_group >= 36  # one query set, as evaluation predicts a task's
    # a larger set is dealt round-robin into groups: each the same computation as predicting
    # that group alone
    adapted.max_query_group = 20
    grouped = adapted.predict_proba(queries)
    assert torch.equal(adapted.predict_proba(queries[1::2]), grouped[1::2])
    assert not torch.equal(grouped, probs)  # batch statistics of the query set
    adapted.max_query_group = 100
    assert adapted.predict(queries[:2]) == [adapted.classes[i]
                                           for i in adapted.logits(queries[:2]).argmax(-1)]
    # fewer adaptation steps give another prediction
    one_step = model.adapt(support, ["a", "b", "c"], steps=1).logits(queries)
    assert not torch.equal(one_step, adapted.logits(queries))


def test_readme_python_example_runs(trained, tmp_path):
    """The README's "Use a trained model" Python block, run as written (cwd holding support/
    and queries/, the run named my-run)."""
    home, src, _ = trained
    text = README.read_text()
    section = text[text.index("## Use a trained model"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "mamlpp.load(" in code
    _held_out_task(tmp_path, src, _test_classes(home)[:5])
    env = dict(os.environ, MAMLPP_HOME=str(home), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 20 and all(len(line.split()) == 3 for line in lines), lines
