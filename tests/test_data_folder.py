"""`mamlpp data import folder`: real images in mixed sizes, formats and colour modes become a
cache checked against an independent decode; the class split is the documented seeded cut
(or the folders', or a file's); broken files and tiny classes are skipped with warnings; the
normalisation is the train split's; classes with varying counts sample correctly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import ConfigError, resolve
from engine.data import TaskSampler, load_cached, load_dataset, require_dataset
from engine.data.datasets import dataset_info
from engine.data.folder import import_folder, parse_split, run_data_notes
from engine.errors import UserError
from engine.preprocess import Preprocessing
from mamlpp_tui import cli
from tests.data_fixtures import leftovers, tree_digest
from tests.own_data_fixtures import mixed_rgb_folder, needs_images, save

pytestmark = needs_images


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    src = tmp_path_factory.mktemp("mixed") / "photos"
    notes = mixed_rgb_folder(src)
    root = tmp_path_factory.mktemp("data")
    before = tree_digest(src)
    messages = []

    class Notes:
        def start(self, *a, **k): pass
        def advance(self, n=1): pass
        def done(self): pass
        def note(self, m): messages.append(m)

    dataset = import_folder(src, "photos", size=32, channels=3, root=root, reporter=Notes())
    assert tree_digest(src) == before  # the user's files are only read
    return src, root, dataset, notes, messages


def _expected(path: Path, size: int) -> np.ndarray:
    """The documented rule, written out: RGB, shorter side to `size` by a centre crop of the
    longer one, LANCZOS."""
    im = Image.open(path)
    if "A" in im.getbands():
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im.convert("RGBA"))
    im = im.convert("RGB")
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side))
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(im).transpose(2, 0, 1)


def test_images_equal_an_independent_decode(mixed):
    src, _, dataset, notes, _ = mixed
    checked = set()
    for split in ("train", "val", "test"):
        counts = dataset.class_counts.get(split)
        offset = 0
        for ci, name in enumerate(dataset.class_names[split]):
            n = counts[ci] if counts else dataset.splits[split].shape[1]
            files = sorted(p for p in (src / name).iterdir()
                           if p.suffix != ".txt" and p.name != "broken.jpg")
            assert len(files) == n, name
            for ii, f in enumerate(files):
                got = (dataset.splits[split][offset + ii] if counts
                       else dataset.splits[split][ci, ii]).numpy()
                want = _expected(f, 32)
                assert np.array_equal(got, want), (name, f.name)
            offset += n
            checked.add(notes[name])
    assert {"png", "bmp", "120x90", "50x70", "one grayscale", "one rgba",
            "omniglot grayscale 105x105", "four images"} <= checked


def test_broken_files_and_tiny_classes_are_reported_and_left_out(mixed):
    _, root, dataset, notes, messages = mixed
    manifest = dataset.manifest
    assert manifest["skipped_files"] == 2  # broken.jpg and notes.txt
    single = next(n for n, what in notes.items() if what == "single image")
    names = {n for v in dataset.class_names.values() for n in v}
    assert sorted(manifest["excluded_classes"]) == sorted([single, "empty_class"])
    assert single not in names and "empty_class" not in names
    assert names == set(notes) - {single, "empty_class"}
    text = " ".join(messages)
    assert "skipped 2 unreadable or non-image files" in text
    assert "fewer than 2 readable images" in text and "empty_class (0)" in text
    assert f"{single} (1)" in text
    assert "converted" in text and "to RGB" in text  # the grayscale ones
    assert leftovers(root) == []


def test_split_is_the_documented_seeded_cut(mixed):
    _, _, dataset, _, _ = mixed
    names = sorted(n for v in dataset.class_names.values() for n in v)
    order = sorted(names, key=lambda n: hashlib.sha256(f"0/{n}".encode()).digest())
    n = len(names)
    n_val, n_test = round(0.16 * n), round(0.20 * n)
    cut = n - n_val - n_test
    want = {"train": sorted(order[:cut]), "val": sorted(order[cut:n - n_test]),
            "test": sorted(order[n - n_test:])}
    assert dataset.class_names == want
    split = dataset.manifest["class_split"]
    assert split["method"] == "seeded" and split["seed"] == 0
    assert split["fractions"] == [0.64, 0.16, 0.2]


def test_normalisation_is_the_train_splits_mean_and_std(mixed):
    _, _, dataset, _, _ = mixed
    train = dataset.splits["train"]
    x = train.double() / 255
    dims = (0, 2, 3) if train.dim() == 4 else (0, 1, 3, 4)
    mean = x.mean(dim=dims)
    std = x.std(dim=dims, unbiased=False)
    got_mean, got_std = dataset.normalize
    assert np.allclose(got_mean, mean.numpy(), atol=1e-9)
    assert np.allclose(got_std, std.numpy(), atol=1e-9)
    prep = Preprocessing.from_manifest(dataset.manifest)
    assert (prep.method, prep.size, prep.channels) == ("center_crop", 32, 3)
    # the float input: (x / 255 - mean) / std, as the sampler computes it
    sampler = TaskSampler(dataset, "train", 3, 1, 1, seed=0)
    raw = sampler.raw_batch(0, 1)
    want = ((raw.x_query.double() / 255 - mean.view(3, 1, 1)) / std.view(3, 1, 1)).float()
    assert torch.allclose(sampler.to_float(raw).x_query, want, atol=1e-5)
    assert torch.equal(prep.to_float(raw.x_query), sampler.to_float(raw).x_query)


def test_cache_reloads_and_verifies(mixed):
    _, root, dataset, _, _ = mixed
    again = load_cached("photos", root, verify=True)
    assert again.class_counts == dataset.class_counts
    assert dataset.class_counts, "the mixed folder has classes of different sizes"
    for split, counts in dataset.class_counts.items():
        assert dataset.splits[split].shape[0] == sum(counts)
    info = next(d for d in dataset_info(root)["datasets"] if d["name"] == "photos")
    for split, counts in dataset.class_counts.items():
        assert (info["splits"][split]["per_class"], info["splits"][split]["per_class_max"],
                info["splits"][split]["images"]) == (min(counts), max(counts), sum(counts))


def test_varying_counts_sample_distinct_images_of_each_class_and_skip_small_ones(mixed):
    _, _, dataset, _, _ = mixed
    split = next(s for s, c in dataset.class_counts.items() if min(c) < max(c))
    counts = dataset.class_counts[split]
    need = sorted(set(counts))[1]  # leaves out the smallest classes
    ways = sum(c >= need for c in counts)
    sampler = TaskSampler(dataset, split, ways, need - 1, 1, seed=3)
    small = [dataset.class_names[split][i] for i, c in enumerate(counts) if c < need]
    assert sampler.excluded == small and small
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    kept = [i for i, c in enumerate(counts) if c >= need]
    for t in range(5):
        classes, picks, _ = sampler.task_indices(t)
        rows = sampler.flat_index(classes, picks)
        for w, c in enumerate(classes.tolist()):
            cls = kept[c]
            lo, hi = offsets[cls], offsets[cls] + counts[cls]
            r = rows[w].tolist()
            assert len(set(r)) == need and all(lo <= x < hi for x in r)
        again = sampler.task_indices(t)
        assert all(torch.equal(a, b) for a, b in zip((classes, picks), again[:2]))
    with pytest.raises(UserError, match="needs at least"):
        TaskSampler(dataset, split, len(counts), need - 1, 1, seed=0)


def test_given_split_folders_and_splits_files(tmp_path):
    src = tmp_path / "given"
    for split, classes in {"train": ["a", "b", "c"], "validation": ["d", "e"],
                           "test": ["f", "g"]}.items():
        for k, c in enumerate(classes):
            for j in range(3):
                value = 40 * k + 10 * j + (ord(c) % 7)
                save(Image.new("RGB", (20 + j, 16), (value, 100, 200)),
                     src / split / c / f"{j}.png")
    root = tmp_path / "data"
    ds = import_folder(src, "given", size=16, root=root)
    assert ds.class_names == {"train": ["a", "b", "c"], "val": ["d", "e"], "test": ["f", "g"]}
    assert ds.manifest["class_split"]["method"] == "folders"
    with pytest.raises(UserError, match="used as given"):
        import_folder(src, "given2", size=16, split=(0.5, 0.25, 0.25), root=root)
    # the same classes without the split folders, split by a file (JSON, manifest, CSV)
    flat = tmp_path / "flat"
    for p in src.glob("*/*/*.png"):
        save(Image.open(p), flat / p.parent.name / p.name)
    want = {"train": ["a", "f", "g"], "val": ["b", "c"], "test": ["d", "e"]}
    (tmp_path / "s.json").write_text(json.dumps(want))
    assert import_folder(flat, "byjson", size=16, splits_from=tmp_path / "s.json",
                         root=root).class_names == want
    again = import_folder(flat, "bymanifest", size=16, root=root,
                          splits_from=root / "byjson" / "manifest.json")
    assert again.class_names == want
    (tmp_path / "s.csv").write_text("class,split\n" + "".join(
        f"{c},{s}\n" for s, cs in want.items() for c in cs))
    assert import_folder(flat, "bycsv", size=16, splits_from=tmp_path / "s.csv",
                         root=root).class_names == want
    (tmp_path / "bad.json").write_text(json.dumps({**want, "train": ["a", "zzz", "g"]}))
    with pytest.raises(UserError, match="zzz"):
        import_folder(flat, "bad", size=16, splits_from=tmp_path / "bad.json", root=root)
    # deterministic: the same seed gives the same split; a split that leaves a split with one
    # class is refused
    assert import_folder(flat, "s1", size=16, seed=5, split=(0.4, 0.3, 0.3),
                         root=root).class_names == \
        import_folder(flat, "s2", size=16, seed=5, split=(0.4, 0.3, 0.3), root=root).class_names
    with pytest.raises(UserError, match="at least 2 classes"):
        import_folder(flat, "s3", size=16, split=(0.8, 0.1, 0.1), root=root)
    assert leftovers(root) == []


def test_bad_input_is_one_sentence(tmp_path):
    junk = tmp_path / "junk" / "cls"
    junk.mkdir(parents=True)
    (junk / "a.jpg").write_text("nope")
    with pytest.raises(UserError, match="None of the 1 files"):
        import_folder(tmp_path / "junk", "junk", root=tmp_path / "d")
    for name in ("omniglot", "Birds", "9lives", "true", "a b"):
        with pytest.raises(UserError, match="--name"):
            import_folder(tmp_path / "junk", name, root=tmp_path / "d")
    for text in ("0.5,0.5", "0.7,0.2,0.2", "1,0,0", "a,b,c"):
        with pytest.raises(UserError, match="--split"):
            parse_split(text)
    with pytest.raises(UserError, match="not a folder"):
        import_folder(tmp_path / "nothing", "x", root=tmp_path / "d")
    part = tmp_path / "part"
    (part / "train" / "a").mkdir(parents=True)
    (part / "test" / "b").mkdir(parents=True)
    with pytest.raises(UserError, match="no val/"):
        import_folder(part, "part", root=tmp_path / "d")
    assert leftovers(tmp_path / "d") == []


def test_cli_import_then_any_preset_takes_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MAMLPP_HOME", str(tmp_path / "home"))
    src = tmp_path / "small"
    rng = np.random.default_rng(0)
    for c in range(12):
        for j in range(3):
            save(Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)),
                 src / f"class{c}" / f"{j}.png")
    code = _main(["data", "import", "folder", str(src), "--name", "tiny", "--size", "8"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "tiny cached in" in out and "--set data.dataset=tiny" in out
    assert _main(["data", "info", "--json"]) == 0
    info = json.loads(capsys.readouterr()[0])
    assert "tiny" in [d["name"] for d in info["datasets"]]
    require_dataset("tiny")
    assert load_dataset("tiny").image_shape == (3, 8, 8)
    # quickstart's network has 4 stages: 8x8 images are too small, and the error names the key
    cfg = resolve("quickstart", overrides=["data.dataset=tiny"])
    with pytest.raises(ConfigError, match="model.stages"):
        run_data_notes(cfg)
    code = _main(["run", "--no-tui", "--set", "data.dataset=tiny"])
    err = capsys.readouterr()[1]
    assert code == 2 and "model.stages must be at most 3" in err and len(err.splitlines()) == 1
    assert resolve("quickstart", overrides=["data.dataset=tiny", "model.stages=3"]).image_shape \
        == (3, 8, 8)
    code = _main(["run", "--no-tui", "--set", "data.dataset=tiny", "--set", "model.stages=3",
                  "--set", "data.queries=3"])
    err = capsys.readouterr()[1]
    assert code == 2 and "has 0 (its largest class has 3 images)" in err, err
    assert not (tmp_path / "home" / "runs").exists()  # refused before a run was made
    code = _main(["run", "--no-tui", "--set", "data.dataset=nosuch"])
    err = capsys.readouterr()[1]
    assert code == 2 and "mamlpp data import folder PATH --name nosuch" in err
    for argv, needle in [(["data", "import", "folder", str(src)], "--name"),
                         (["data", "import", "miniimagenet", str(src), "--size", "8"], "--size"),
                         (["data", "import", "folder", str(src), "--name", "t2", "--split",
                           "1,2"], "--split")]:
        code = _main(argv)
        err = capsys.readouterr()[1]
        assert code == 2 and needle in err and len(err.splitlines()) == 1, err


def _main(argv: list[str]) -> int:
    try:
        cli.main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0
