"""mini-ImageNet import: the three layouts (and archives) give identical tensors, checked
against an independent decode; the restricted unpickler runs nothing; bad input is refused
without touching the user's files or leaving a cache behind."""

from __future__ import annotations

import errno
import io
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import engine.data.cache as cache_module
from engine.data import import_miniimagenet, load_cached, load_dataset
from engine.data.progress import LineReporter
from engine.errors import UserError
from tests.data_fixtures import (
    MINI_FOLDERS,
    MINI_SAMPLE,
    build_archive,
    build_csv_layout,
    build_folder_copy,
    build_pickle_layout,
    leftovers,
    needs_mini_sample,
    sample_files,
    tree_digest,
)

pytestmark = needs_mini_sample


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The shared sample (layout a, PATH holding mini_imagenet_full_size/) imported once."""
    root = tmp_path_factory.mktemp("mini_ref")
    before = tree_digest(MINI_SAMPLE)
    t0 = time.perf_counter()
    dataset = import_miniimagenet(MINI_SAMPLE, root)
    print(f"\nmini-ImageNet sample import (600 images): {time.perf_counter() - t0:.2f} s")
    assert tree_digest(MINI_SAMPLE) == before
    return dataset


def test_sample_imports_with_the_standard_split(reference):
    counts = reference.counts()
    assert {s: c["classes"] for s, c in counts.items()} == {"train": 64, "val": 16, "test": 20}
    assert all(c["per_class"] == 6 for c in counts.values())
    assert reference.image_shape == (3, 84, 84)
    assert reference.pixel_max == 255 and reference.train_augment is None
    assert reference.normalize == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert load_cached("miniimagenet", reference.path.parent, verify=True) is not None


def test_tensors_equal_an_independent_decode(reference):
    for split, classes in sample_files().items():
        assert reference.class_names[split] == sorted(classes)
        for ci, wnid in enumerate(sorted(classes)):
            for ii, f in enumerate(classes[wnid]):
                with Image.open(f) as im:
                    expected = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
                assert np.array_equal(reference.splits[split][ci, ii].numpy(), expected)


LAYOUTS = {  # name: (build the layout in a tmp dir -> PATH to import, detected layout)
    "folder_itself": (lambda d: MINI_FOLDERS, "folders"),
    "csv": (lambda d: build_csv_layout(d / "csv"), "csv"),
    "pickle": (lambda d: build_pickle_layout(d / "pkl"), "pickle"),
    "pickle_py2_protocol_validation_name": (lambda d: build_pickle_layout(
        d / "pkl2", protocol=2, val_name="validation", reverse_rows=True), "pickle"),
    "pickle_file_path": (lambda d: build_pickle_layout(d / "pkl5", protocol=5)
                         / "mini-imagenet-cache-train.pkl", "pickle"),
    "zip": (lambda d: build_archive(d / "arc", "zip"), "folders"),
    "tar": (lambda d: build_archive(d / "arc", "tar"), "folders"),
    "tar.gz": (lambda d: build_archive(d / "arc", "tar.gz"), "folders"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_gives_identical_tensors(tmp_path, reference, layout):
    build, detected = LAYOUTS[layout]
    path = build(tmp_path)
    before = tree_digest(path.parent if path.is_file() else path)
    dataset = import_miniimagenet(path, tmp_path / "data")
    assert dataset.manifest["content_sha256"] == reference.manifest["content_sha256"]
    assert dataset.class_names == reference.class_names
    for split, x in reference.splits.items():
        assert torch.equal(dataset.splits[split], x)
    assert dataset.manifest["source"]["layout"] == detected
    assert tree_digest(path.parent if path.is_file() else path) == before


def test_other_sizes_are_resized_to_84(tmp_path):
    def bigger_png(im: Image.Image):
        return im.resize((100, 90), Image.Resampling.BICUBIC), ".png"

    path = build_csv_layout(tmp_path / "csv", convert=bigger_png)
    dataset = import_miniimagenet(path, tmp_path / "data")
    wnid = sorted(sample_files()["val"])[3]
    f = sorted((path / "images").glob(f"{wnid}*.png"))[2]
    with Image.open(f) as im:
        assert im.size == (100, 90)
        expected = np.asarray(im.convert("RGB").resize((84, 84), Image.Resampling.LANCZOS))
    got = dataset.splits["val"][3, 2].numpy().transpose(1, 2, 0)
    assert np.array_equal(got, expected)


class _Evil:
    def __init__(self, command: str, marker: Path) -> None:
        self.command, self.marker = command, marker

    def __reduce__(self):
        if self.command == "open":
            return (open, (str(self.marker), "w"))
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("command", ["open", "os.system"])
def test_malicious_pickle_runs_nothing(tmp_path, reference, command):
    folder = build_pickle_layout(tmp_path / "pkl")
    marker = tmp_path / "pwned"
    payload = {"image_data": _Evil(command, marker), "class_dict": {"n01": [0]}}
    (folder / "mini-imagenet-cache-val.pkl").write_bytes(pickle.dumps(payload))
    with pytest.raises(UserError) as err:
        import_miniimagenet(folder, tmp_path / "data")
    assert "refused" in str(err.value) and "nothing in it was run" in str(err.value)
    assert not marker.exists()
    assert load_cached("miniimagenet", tmp_path / "data") is None
    assert leftovers(tmp_path / "data") == []


def test_the_evil_pickle_would_really_run(tmp_path):
    """Guard for the test above: the unrestricted unpickler does create the marker."""
    marker = tmp_path / "pwned"
    data = pickle.dumps({"image_data": _Evil("open", marker)})
    code = f"import pickle,sys; pickle.loads(bytes.fromhex('{data.hex()}'))"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert marker.exists()


def _drop_class(path: Path) -> None:
    shutil.rmtree(next((path / "mini_imagenet_full_size" / "train").iterdir()))


def _extra_image(path: Path) -> None:
    d = sorted((path / "mini_imagenet_full_size" / "test").iterdir())[2]
    shutil.copyfile(next(d.glob("*.jpg")), d / "zz_extra.jpg")


def _truncate_jpeg(path: Path) -> None:
    f = sorted((path / "mini_imagenet_full_size" / "val").rglob("*.jpg"))[7]
    f.write_bytes(f.read_bytes()[:700])


def _empty_class(path: Path) -> None:
    d = sorted((path / "mini_imagenet_full_size" / "val").iterdir())[0]
    for f in d.iterdir():
        f.unlink()


def _no_test(path: Path) -> None:
    shutil.rmtree(path / "mini_imagenet_full_size" / "test")


def _shared_class(path: Path) -> None:
    base = path / "mini_imagenet_full_size"
    d = sorted((base / "val").iterdir())[0]
    shutil.copytree(d, base / "test" / d.name)
    shutil.rmtree(sorted((base / "test").iterdir())[-1])


FOLDER_FAULTS = {
    "drop_class": (_drop_class, "63 train, 16 val, 20 test classes"),
    "extra_image": (_extra_image, "has 7 images, but the other classes have 6"),
    "truncated_jpeg": (_truncate_jpeg, "Cannot read image"),
    "empty_class": (_empty_class, "has no images"),
    "no_test_split": (_no_test, "but not for test"),
    "class_in_two_splits": (_shared_class, "is in both the val and the test split"),
}


@pytest.mark.parametrize("fault", list(FOLDER_FAULTS))
def test_bad_folder_layout_is_a_clear_error(tmp_path, fault):
    path = build_folder_copy(tmp_path / "src")
    damage, expected = FOLDER_FAULTS[fault]
    damage(path)
    before = tree_digest(path)
    with pytest.raises(UserError) as err:
        import_miniimagenet(path, tmp_path / "data")
    assert expected in str(err.value)
    assert tree_digest(path) == before
    assert load_cached("miniimagenet", tmp_path / "data") is None
    assert leftovers(tmp_path / "data") == []


def test_any_split_accepts_other_class_counts(tmp_path):
    path = build_folder_copy(tmp_path / "src")
    _drop_class(path)
    dataset = import_miniimagenet(path, tmp_path / "data", any_split=True)
    assert dataset.counts()["train"]["classes"] == 63


def _bad_header(path: Path) -> None:
    text = (path / "val.csv").read_text()
    (path / "val.csv").write_text(text.replace("filename,label", "file,wnid"))


def _missing_file(path: Path) -> None:
    with open(path / "test.csv", "a") as f:
        f.write("n9999999900000001.jpg,n01930112\n")


CSV_FAULTS = {
    "bad_header": (_bad_header, "must start with the header filename,label"),
    "missing_file": (_missing_file, "lists n9999999900000001.jpg (line 122)"),
    "no_csv_for_val": (lambda p: (p / "val.csv").unlink(), "but not for val"),
}


@pytest.mark.parametrize("fault", list(CSV_FAULTS))
def test_bad_csv_layout_is_a_clear_error(tmp_path, fault):
    path = build_csv_layout(tmp_path / "csv")
    damage, expected = CSV_FAULTS[fault]
    damage(path)
    with pytest.raises(UserError) as err:
        import_miniimagenet(path, tmp_path / "data")
    assert expected in str(err.value)
    assert leftovers(tmp_path / "data") == []


@pytest.mark.parametrize("fault", ["truncated", "wrong_structure", "not_uint8"])
def test_bad_pickle_is_a_clear_error(tmp_path, fault):
    path = build_pickle_layout(tmp_path / "pkl")
    f = path / "mini-imagenet-cache-test.pkl"
    if fault == "truncated":
        f.write_bytes(f.read_bytes()[:5000])
        expected = "is not a readable pickle"
    elif fault == "wrong_structure":
        f.write_bytes(pickle.dumps({"images": [1, 2, 3]}))
        expected = "is not a mini-ImageNet cache pickle"
    else:
        f.write_bytes(pickle.dumps({"image_data": np.zeros((6, 84, 84, 3), np.float32),
                                    "class_dict": {"n1": [0, 1, 2, 3, 4, 5]}}))
        expected = "is not a mini-ImageNet cache pickle"
    with pytest.raises(UserError, match=expected):
        import_miniimagenet(path, tmp_path / "data")
    assert leftovers(tmp_path / "data") == []


def test_wrong_layout_and_missing_path(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="does not look like mini-ImageNet"):
        import_miniimagenet(tmp_path / "junk", tmp_path / "data")
    with pytest.raises(UserError, match="does not exist"):
        import_miniimagenet(tmp_path / "nowhere", tmp_path / "data")
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(UserError, match="not a readable tar archive"):
        import_miniimagenet(tmp_path / "broken.tar.gz", tmp_path / "data")


@pytest.mark.parametrize("where", ["fallocate", "write"])
def test_full_disk_is_a_clear_error_and_keeps_the_old_cache(tmp_path, monkeypatch, reference,
                                                            where):
    root = tmp_path / "data"
    shutil.copytree(reference.path, root / "miniimagenet")  # a good cache from before
    path = build_csv_layout(tmp_path / "csv")
    before = tree_digest(path)
    calls = {"n": 0}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    real_pwrite = os.pwrite

    def pwrite_until_full(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 50:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    if where == "fallocate":
        monkeypatch.setattr(cache_module.os, "posix_fallocate", full)
    else:
        monkeypatch.setattr(cache_module.os, "pwrite", pwrite_until_full)
    with pytest.raises(UserError, match="is full"):
        import_miniimagenet(path, root)
    monkeypatch.undo()
    assert leftovers(root) == []
    assert tree_digest(path) == before
    old = load_cached("miniimagenet", root, verify=True)
    assert old is not None and old.manifest == reference.manifest


def test_progress_goes_through_the_reporter(tmp_path):
    out = io.StringIO()
    import_miniimagenet(MINI_SAMPLE, tmp_path, reporter=LineReporter(out))
    text = out.getvalue()
    assert "6 train, 6 val, 6 test images per class" in text
    assert "import mini-ImageNet (600 images) ..." in text
    assert "import mini-ImageNet: 50% (300 of 600)" in text
    assert "import mini-ImageNet: done (600 images" in text


def test_missing_miniimagenet_names_the_import_command(tmp_path):
    with pytest.raises(UserError) as err:
        load_dataset("miniimagenet", tmp_path)
    assert "`mamlpp data import miniimagenet PATH`" in str(err.value)


FULL_SIZE_SCRIPT = r"""
import resource, sys, time
from pathlib import Path
import numpy as np
from PIL import Image
from engine.data import import_miniimagenet
src, root = Path(sys.argv[1]), Path(sys.argv[2])
rng = np.random.default_rng(0)
tile = rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)
n = 0
for split, classes in (("train", 64), ("val", 16), ("test", 20)):
    for c in range(classes):
        d = src / "mini_imagenet_full_size" / split / f"n{split[:2]}{c:06d}"
        d.mkdir(parents=True)
        for i in range(600):
            Image.fromarray(np.roll(tile, n, axis=1)).save(d / f"{i:08d}.jpg", quality=90)
            n += 1
t0 = time.time()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ds = import_miniimagenet(src, root)
print("images", sum(c["images"] for c in ds.counts().values()))
print("seconds", time.time() - t0)
print("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


@pytest.mark.slow
def test_full_size_import_stays_under_3gb(tmp_path):
    """60,000 synthetic 84x84 JPEGs in the folder layout: peak RSS of the importing process."""
    result = subprocess.run([sys.executable, "-c", FULL_SIZE_SCRIPT, str(tmp_path / "src"),
                             str(tmp_path / "data")], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    values = dict(line.split() for line in result.stdout.splitlines())
    print(values)
    assert int(values["images"]) == 60000
    assert float(values["peak_rss_mb"]) < 3000
