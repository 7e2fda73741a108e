"""Omniglot caches made with mamlpp's previous class split: rebuilt with the reference split
(one line says so), recorded in a run's config.json, and a run whose split changed under it is
not resumed. On a two-alphabet subset of the shared zips, so each conversion takes a second."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from engine.data import convert_omniglot, load_cached, load_dataset, require_dataset
from engine.data.cache import CacheWriter
from engine.data.omniglot import convert_png
from engine.data.progress import Reporter
from engine.errors import UserError
from tests.data_fixtures import OMNIGLOT_DIR, needs_omniglot

pytestmark = needs_omniglot

ZIPS = ("images_background.zip", "images_evaluation.zip")
TINY = ["train.epochs=1", "train.iters_per_epoch=2", "train.meta_batch=2", "model.filters=8",
        "train.inner_steps=1", "train.eval_inner_steps=1", "eval.val_tasks=2",
        "eval.test_tasks=2", "eval.ensemble_top_k=1"]


def _sets(*overrides: str) -> list[str]:
    return [a for o in (*TINY, *overrides) for a in ("--set", o)]


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> tuple[list[Path], list[str]]:
    """Zips with the first alphabet of each shared zip; and their `zip/alphabet/character`."""
    dest = tmp_path_factory.mktemp("subset")
    paths, keys = [], set()
    for zname in ZIPS:
        with zipfile.ZipFile(OMNIGLOT_DIR / zname) as src, \
                zipfile.ZipFile(dest / zname, "w") as dst:
            names = [n for n in src.namelist() if n.endswith(".png")]
            first = sorted({n.split("/")[1] for n in names})[0]
            for n in names:
                if n.split("/")[1] == first:
                    dst.writestr(n, src.read(n))
                    keys.add(n.rsplit("/", 1)[0])
        paths.append(dest / zname)
    return paths, sorted(keys)


def _sizes(n: int, held_out: int = 6) -> tuple[int, int, int]:
    return n - 2 * held_out, held_out, held_out


def write_previous_cache(zips: list[Path], keys: list[str], root: Path,
                         sizes: tuple[int, int, int]) -> None:
    """An Omniglot cache as mamlpp wrote it before the reference split: classes named by their
    zip path `images_background/<alphabet>/<character>`, put in the order of sha256("0/<path>"),
    cut by `sizes`, each split sorted; its manifest has no `class_split`."""
    order = sorted(keys, key=lambda p: hashlib.sha256(f"0/{p}".encode()).digest())
    split, start = {}, 0
    for name, n in zip(("train", "val", "test"), sizes, strict=True):
        split[name] = sorted(order[start:start + n])
        start += n
    archives = {z.stem: zipfile.ZipFile(z) for z in zips}
    try:
        with CacheWriter("omniglot", {s: (len(v), 20) for s, v in split.items()}, (1, 28, 28),
                         root) as writer:
            for s, names in split.items():
                for ci, key in enumerate(names):
                    archive = archives[key.split("/")[0]]
                    files = sorted(n for n in archive.namelist() if n.startswith(key + "/"))
                    block = np.stack([convert_png(archive.read(f), f)[None] for f in files])
                    writer.write(s, ci, 0, block)
            writer.commit({
                "pixel_max": 1, "normalize": None, "train_augment": "rot90",
                "source": {"kind": "local", "paths": [str(z) for z in zips]},
                "class_names": split,
                "details": {"split": "classes ordered by sha256('<seed>/<path>'), cut 1150/50/423",
                            "split_seed": 0, "split_sizes": list(sizes)},
            })
    finally:
        for archive in archives.values():
            archive.close()


class Notes(Reporter):
    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, message: str) -> None:
        self.notes.append(message)


def _reference(keys: list[str], sizes: tuple[int, int, int]) -> dict[str, list[str]]:
    """The reference shuffle of `<alphabet>/<character>` names, cut at `sizes`, written out."""
    names = sorted(k.split("/", 1)[1] for k in keys)
    index = np.arange(len(names), dtype=np.int32)
    np.random.RandomState(np.random.RandomState(0).randint(1, 999999)).shuffle(index)
    cuts = np.cumsum([0, *sizes])
    return {s: sorted(names[i] for i in index[cuts[k]:cuts[k + 1]])
            for k, s in enumerate(("train", "val", "test"))}


def test_previous_split_is_rebuilt_on_use_with_one_line(subset, tmp_path):
    zips, keys = subset
    sizes = _sizes(len(keys))
    root = tmp_path / "data"
    write_previous_cache(zips, keys, root, sizes)
    old = load_cached("omniglot", root)
    assert old.class_names["val"][0].startswith("images_")  # really the previous naming
    notes = Notes()
    dataset = load_dataset("omniglot", root, reporter=notes)
    assert len(notes.notes) == 1, notes.notes
    assert "previous class split" in notes.notes[0] and "rebuilding" in notes.notes[0]
    assert "\n" not in notes.notes[0]
    assert dataset.manifest["class_split"]["method"] == "reference"
    assert dataset.class_names == _reference(keys, sizes)
    # the same cache as a fresh conversion of the same files
    fresh = convert_omniglot(zips, tmp_path / "fresh", split_sizes=sizes)
    assert dataset.manifest["content_sha256"] == fresh.manifest["content_sha256"]
    notes.notes.clear()
    load_dataset("omniglot", root, reporter=notes)
    assert notes.notes == []  # rebuilt once


def test_previous_split_without_its_files_names_the_command(subset, tmp_path):
    zips, keys = subset
    moved = tmp_path / "zips"
    moved.mkdir()
    copies = [moved / z.name for z in zips]
    for z, c in zip(zips, copies, strict=True):
        c.write_bytes(z.read_bytes())
    write_previous_cache(copies, keys, tmp_path / "data", _sizes(len(keys)))
    for c in copies:
        c.unlink()
    with pytest.raises(UserError) as err:
        require_dataset("omniglot", tmp_path / "data")
    message = str(err.value)
    assert "previous class split" in message
    assert "`mamlpp data fetch omniglot --force`" in message
    assert message.count(". ") == 0 and message.endswith(".")  # one sentence


def _main(*argv: str) -> int:
    from mamlpp_tui import cli

    try:
        cli.main(list(argv))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def test_run_rebuilds_records_the_split_and_refuses_to_resume_on_another(
        subset, tmp_path, monkeypatch, capsys):
    from engine.run_store import RunDir, list_runs
    from engine.trainer import Trainer

    zips, keys = subset
    sizes = _sizes(len(keys))
    monkeypatch.setenv("MAMLPP_HOME", str(tmp_path))
    write_previous_cache(zips, keys, tmp_path / "data", sizes)

    # a paper preset on the old cache: one line, the rebuild, then the run
    assert _main("run", "--preset", "omniglot-5w1s", "--no-tui", "--device", "cpu",
                 *_sets()) == 0
    out = capsys.readouterr().out
    assert sum("previous class split" in line for line in out.splitlines()) == 1, out
    (run,) = list_runs()
    runtime = run.read_config()["runtime"]["data_split"]
    assert runtime["method"] == "reference"
    assert runtime["classes"] == dict(zip(("train", "val", "test"), sizes, strict=True))
    listing = load_cached("omniglot", tmp_path / "data").class_names
    assert listing == _reference(keys, sizes)

    # a run stopped with a checkpoint (Ctrl-C after its first iteration)
    from engine.config import resolve
    from engine.run_store import create_run

    config = resolve("omniglot-5w1s", overrides=[*TINY, "train.iters_per_epoch=4"])
    stopped = create_run(config.to_dict(), "cut")

    def interrupt(progress) -> None:  # noqa: ANN001
        raise KeyboardInterrupt

    assert Trainer(stopped, "cpu", on_progress=interrupt).train() == "stopped"
    assert list(stopped.checkpoints_dir.glob("*.safetensors"))
    recorded = stopped.read_config()["runtime"]["data_split"]

    # the cache is rebuilt with other classes in each split: resume is refused, one sentence,
    # by the CLI and by the engine itself
    convert_omniglot(zips, tmp_path / "data", split_sizes=_sizes(len(keys), 5))
    assert _main("resume", stopped.run_id, "--no-tui", "--device", "cpu") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "cannot resume on other classes" in err and recorded["digest"] in err
    with pytest.raises(UserError, match="cannot resume on other classes"):
        Trainer(RunDir(stopped.path), "cpu").train()

    # a run made before runs recorded their split used the previous split: refused too
    convert_omniglot(zips, tmp_path / "data", split_sizes=sizes)
    raw = stopped.read_config()
    without = dict(raw, runtime={k: v for k, v in raw["runtime"].items() if k != "data_split"})
    stopped.config_path.write_text(json.dumps(without))
    assert _main("resume", stopped.run_id, "--no-tui", "--device", "cpu") == 2
    assert "previous Omniglot class split" in capsys.readouterr().err

    # with its classes back, it resumes and finishes
    stopped.config_path.write_text(json.dumps(raw))
    assert _main("resume", stopped.run_id, "--no-tui", "--device", "cpu") == 0
    assert RunDir(stopped.path).read_status()["state"] == "finished"
