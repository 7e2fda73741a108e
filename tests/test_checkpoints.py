"""Checkpoints: exact roundtrips, corruption caught by hash, fallback, retention, full disk."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from engine.checkpoints import (
    CheckpointError,
    NoCheckpointError,
    epoch_name,
    list_checkpoints,
    load_checkpoint,
    load_latest_valid,
    prune,
    read_latest,
    save_checkpoint,
    write_latest,
)


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(4, 6, generator=g)
    return {
        "f32": base,
        "f64": torch.randn(3, generator=g, dtype=torch.float64),
        "f16": base.half(),
        "bf16": base.bfloat16(),
        "i64": torch.randint(-(2**62), 2**62, (5,), generator=g, dtype=torch.int64),
        "i32": torch.arange(7, dtype=torch.int32),
        "u8": torch.randint(0, 255, (2, 3), generator=g, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.25),
        "step": torch.tensor(12345, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
        "view_t": base.t(),  # non-contiguous
        "view_row": base[1],  # shares memory with f32
    }


def _files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_roundtrip_is_exact_and_atomic(tmp_path):
    tensors = _tensors()
    meta = {"iteration": 500, "epoch": 1, "val_accuracy": 0.5, "loss": float("nan"),
            "rng": {"seed": 3}}
    path = save_checkpoint(tmp_path, epoch_name(1), tensors, meta)
    assert path == tmp_path / "epoch-0001.safetensors"
    assert _files(tmp_path) == ["epoch-0001.json", "epoch-0001.safetensors", "latest.json"]
    assert read_latest(tmp_path) == "epoch-0001"
    loaded, loaded_meta = load_checkpoint(tmp_path, "epoch-0001")
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype, key
        assert loaded[key].shape == value.shape, key
        assert torch.equal(loaded[key], value), key
    assert loaded["scalar"].dim() == 0 and loaded["step"].item() == 12345
    assert loaded_meta["iteration"] == 500 and loaded_meta["rng"] == {"seed": 3}
    assert loaded_meta["loss"] is None  # NaN stored as strict-JSON null
    sidecar = json.loads((tmp_path / "epoch-0001.json").read_text())
    assert sidecar["file"] == "epoch-0001.safetensors" and len(sidecar["sha256"]) == 64


def test_flipped_byte_is_rejected_by_hash(tmp_path):
    save_checkpoint(tmp_path, "epoch-0001", _tensors(), {"iteration": 1})
    f = tmp_path / "epoch-0001.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(tmp_path, "epoch-0001")


def test_missing_and_empty(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path, "epoch-0009")
    with pytest.raises(NoCheckpointError):
        load_latest_valid(tmp_path)


def test_truncated_newest_falls_back_to_previous(tmp_path):
    for epoch in (1, 2, 3):
        save_checkpoint(tmp_path, epoch_name(epoch), _tensors(epoch), {"iteration": epoch * 100})
    newest = tmp_path / "epoch-0003.safetensors"
    size = newest.stat().st_size
    with open(newest, "r+b") as f:
        f.truncate(size // 2)
    name, tensors, meta, skipped = load_latest_valid(tmp_path)
    assert name == "epoch-0002" and meta["iteration"] == 200
    assert torch.equal(tensors["f32"], _tensors(2)["f32"])
    assert skipped == [("epoch-0003", f"truncated ({size // 2} of {size} bytes)")]


def test_fallback_order_is_by_iteration_when_pointer_is_bad(tmp_path):
    # Saved out of name order: the iteration counter, not the name, decides "newest".
    save_checkpoint(tmp_path, "b", _tensors(1), {"iteration": 300})
    save_checkpoint(tmp_path, "c", _tensors(2), {"iteration": 200})
    save_checkpoint(tmp_path, "a", _tensors(3), {"iteration": 400})
    (tmp_path / "a.json").write_text("{not json")
    assert list_checkpoints(tmp_path)[:2] == ["b", "c"]
    name, _, _, skipped = load_latest_valid(tmp_path)
    assert name == "b"
    assert skipped == [("a", "sidecar is not valid JSON")]
    for n in ("b", "c"):
        (tmp_path / f"{n}.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="No valid checkpoint") as info:
        load_latest_valid(tmp_path)
    assert [n for n, _ in info.value.skipped] == ["a", "b", "c"]


def test_prune_keeps_newest_plus_top_k(tmp_path):
    accuracies = {1: 0.50, 2: 0.90, 3: 0.70, 4: 0.80, 5: None, 6: 0.60, 7: 0.30}
    for epoch, acc in accuracies.items():
        meta = {"iteration": epoch * 10, "val_accuracy": acc}
        save_checkpoint(tmp_path, epoch_name(epoch), {"w": torch.full((2,), epoch)}, meta)
    # top-2 by accuracy: epochs 2 (0.9) and 4 (0.8); newest: 7. Pointer also on 7.
    deleted = prune(tmp_path, keep_top_k=2)
    assert sorted(deleted) == [epoch_name(e) for e in (1, 3, 5, 6)]
    assert _files(tmp_path) == sorted(
        [f"{epoch_name(e)}{ext}" for e in (2, 4, 7) for ext in (".json", ".safetensors")]
        + ["latest.json"]
    )
    for e in (2, 4, 7):
        load_checkpoint(tmp_path, epoch_name(e))


def test_prune_never_deletes_pointer_target(tmp_path):
    for epoch, acc in {1: 0.1, 2: 0.9, 3: 0.2, 4: 0.3}.items():
        save_checkpoint(tmp_path, epoch_name(epoch), {"w": torch.zeros(1)},
                        {"iteration": epoch, "val_accuracy": acc})
    write_latest(tmp_path, epoch_name(1))
    assert load_latest_valid(tmp_path)[0] == epoch_name(1)  # the pointer is tried first
    assert sorted(prune(tmp_path, keep_top_k=1)) == [epoch_name(3)]
    assert list_checkpoints(tmp_path) == [epoch_name(e) for e in (4, 2, 1)]


def test_full_disk_leaves_earlier_checkpoints_and_no_temp_files(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, epoch_name(1), _tensors(1), {"iteration": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_write = os.write

    def full_disk(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path)):
            real_write(fd, bytes(data)[: len(data) // 2])  # a partial temp file, then ENOSPC
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(CheckpointError, match="No space left"):
        save_checkpoint(tmp_path, epoch_name(2), _tensors(2), {"iteration": 2})
    # Overwriting an existing name must not damage it either.
    with pytest.raises(CheckpointError, match="No space left"):
        save_checkpoint(tmp_path, epoch_name(1), _tensors(3), {"iteration": 1})
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    name, tensors, _, skipped = load_latest_valid(tmp_path)
    assert name == epoch_name(1) and not skipped
    assert torch.equal(tensors["i64"], _tensors(1)["i64"])


def test_stale_temp_files_are_swept(tmp_path):
    stale = tmp_path / ".epoch-0001.safetensors.tmp-999999999-abcdef"
    stale.write_bytes(b"partial")
    save_checkpoint(tmp_path, epoch_name(1), {"w": torch.zeros(1)}, {"iteration": 1})
    assert not stale.exists()


def test_rejects_bad_names(tmp_path):
    for bad in ("latest", "../x", "", ".hidden"):
        with pytest.raises(ValueError):
            save_checkpoint(tmp_path, bad, {"w": torch.zeros(1)}, {})
