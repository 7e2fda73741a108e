"""The cache format: atomic writes, a valid safetensors file, damage detected on load, the
restricted unpickler on its own, and the layout of the progress lines."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine.data import dataset_info, load_dataset, require_dataset
from engine.data.cache import CacheWriter, content_sha256, load_cached
from engine.data.progress import LineReporter
from engine.data.safe_pickle import UnsafePickleError, safe_loads
from engine.errors import UserError
from tests.data_fixtures import leftovers


def _write(root, name="omniglot", fail=False):
    rng = np.random.default_rng(0)
    arrays = {"train": rng.integers(0, 2, (4, 3, 1, 5, 5), dtype=np.uint8),
              "val": rng.integers(0, 2, (2, 3, 1, 5, 5), dtype=np.uint8),
              "test": rng.integers(0, 2, (3, 3, 1, 5, 5), dtype=np.uint8)}
    with CacheWriter(name, {s: a.shape[:2] for s, a in arrays.items()}, (1, 5, 5), root) as w:
        for split, a in arrays.items():
            for c in range(a.shape[0]):
                for i in reversed(range(a.shape[1])):  # any order: images go to their slot
                    w.write(split, c, i, a[c, i])
            if fail:
                raise RuntimeError("interrupted")
        w.commit({"pixel_max": 1, "normalize": None, "train_augment": None,
                  "class_names": {s: [f"{s}{i}" for i in range(len(a))]
                                  for s, a in arrays.items()}})
    return arrays


def test_written_cache_is_plain_safetensors_with_a_manifest(tmp_path):
    arrays = _write(tmp_path)
    folder = tmp_path / "omniglot"
    tensors = load_file(folder / "images.safetensors")  # the standard reader agrees
    for split, a in arrays.items():
        assert np.array_equal(tensors[split].numpy(), a)
    manifest = json.loads((folder / "manifest.json").read_text())
    data = b"".join(a.tobytes() for a in arrays.values())
    import hashlib

    assert manifest["content_sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["splits"]["val"] == {"classes": 2, "per_class": 3, "images": 6,
                                         "class_names": ["val0", "val1"]}
    assert manifest["file_size"] == (folder / "images.safetensors").stat().st_size
    assert content_sha256(folder / "images.safetensors",
                          (folder / "images.safetensors").stat().st_size - len(data)) == \
        manifest["content_sha256"]
    assert leftovers(tmp_path) == []


def test_an_interrupted_write_leaves_nothing_and_keeps_the_old_cache(tmp_path):
    _write(tmp_path)
    before = (tmp_path / "omniglot" / "manifest.json").read_text()
    with pytest.raises(RuntimeError):
        _write(tmp_path, fail=True)
    assert leftovers(tmp_path) == []
    assert (tmp_path / "omniglot" / "manifest.json").read_text() == before
    assert load_cached("omniglot", tmp_path, verify=True) is not None


def test_a_killed_import_leaves_only_an_unused_temp_folder_that_is_cleaned_later(tmp_path):
    code = ("import os, sys, numpy as np; from pathlib import Path;"
            "from engine.data.cache import CacheWriter;"
            "w = CacheWriter('omniglot', {'train': (2, 2), 'val': (1, 2), 'test': (1, 2)},"
            " (1, 4, 4), Path(sys.argv[1])).__enter__();"
            "w.write('train', 0, 0, np.ones((1, 4, 4), np.uint8)); os._exit(9)")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)],
                   cwd=os.path.dirname(os.path.dirname(__file__)))
    assert len(leftovers(tmp_path)) == 1
    with pytest.raises(UserError, match="fetch omniglot"):
        load_dataset("omniglot", tmp_path)  # the half-written folder is not a cache
    assert dataset_info(tmp_path)["datasets"] == []
    _write(tmp_path)  # the next write of that dataset removes the dead process's folder
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("damage", ["truncated", "manifest", "bytes"])
def test_damage_is_detected_with_the_fix(tmp_path, damage):
    _write(tmp_path)
    folder = tmp_path / "omniglot"
    tensor_file = folder / "images.safetensors"
    if damage == "truncated":
        tensor_file.write_bytes(tensor_file.read_bytes()[:-10])
    elif damage == "manifest":
        (folder / "manifest.json").write_text("{not json")
    else:
        data = bytearray(tensor_file.read_bytes())
        data[-1] ^= 1
        tensor_file.write_bytes(bytes(data))
    with pytest.raises(UserError) as err:
        load_cached("omniglot", tmp_path, verify=True)
    assert "is damaged" in str(err.value) and "`mamlpp data fetch omniglot`" in str(err.value)
    if damage == "manifest":
        info = dataset_info(tmp_path)
        assert info["datasets"][0]["name"] == "omniglot" and "error" in info["datasets"][0]


def test_unwritable_cache_root_is_a_user_error(tmp_path):
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("not a folder")
        root = blocker / "data"  # cannot create a folder inside a file, even as root
    else:
        root = tmp_path / "ro"
        root.mkdir()
        root.chmod(0o500)
    with pytest.raises(UserError, match="Cannot write the data cache"):
        _write(root)


def test_require_dataset_is_cheap_and_names_the_command(tmp_path):
    with pytest.raises(UserError, match="`mamlpp data import miniimagenet PATH`"):
        require_dataset("miniimagenet", tmp_path)
    require_dataset("quickstart", tmp_path)  # generated on first use: nothing to fetch
    assert not (tmp_path / "quickstart").exists()
    with pytest.raises(UserError, match="Unknown dataset"):
        require_dataset("cifar", tmp_path)
    _write(tmp_path)  # a cache whose manifest records no class split
    require_dataset("omniglot", tmp_path, refresh=False)  # the manifest is there: cheap check
    # an Omniglot cache without the reference split, and no files to rebuild it from
    with pytest.raises(UserError, match="`mamlpp data fetch omniglot --force`"):
        require_dataset("omniglot", tmp_path)


def test_restricted_unpickler_admits_plain_data_only():
    plain = {"a": [1, 2, "x"], "b": np.arange(6, dtype=np.uint8).reshape(2, 3),
             "c": np.int64(7), "d": np.zeros(3, np.float32)}
    for protocol in (2, 4, 5):
        out = safe_loads(pickle.dumps(plain, protocol=protocol))
        assert out["a"] == [1, 2, "x"] and np.array_equal(out["b"], plain["b"])
        assert out["c"] == 7
    for evil in (b"cos\nsystem\n(S'true'\ntR.", b"cbuiltins\neval\n(S'1'\ntR.",
                 pickle.dumps(torch.nn.Linear)):
        with pytest.raises(UnsafePickleError):
            safe_loads(evil)
    # a codec other than latin-1 through _codecs.encode is refused too
    with pytest.raises(UnsafePickleError):
        safe_loads(b"c_codecs\nencode\n(Vx\nVrot13\ntR.")


def test_line_reporter_prints_tenths_and_a_summary():
    out = io.StringIO()
    r = LineReporter(out)
    r.start("job", 20)
    for _ in range(20):
        r.advance()
    r.done()
    lines = out.getvalue().splitlines()
    assert lines[0] == "job (20 items) ..."
    assert lines[1:10] == [f"job: {p}0% ({2 * p} of 20)" for p in range(1, 10)]
    assert lines[10].startswith("job: done (20 items, ")
