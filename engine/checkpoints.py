"""Checkpoints: `<name>.safetensors` + `<name>.json` sidecar, a `latest.json` pointer, retention.

Why this shape (DESIGN.md, "Checkpoints and resume"):

- safetensors for tensors and JSON for everything else, never pickle, so loading a checkpoint
  cannot run code. Tensors are saved as contiguous clones because safetensors refuses views and
  tensors that share storage (tied weights, slices of a flat buffer).
- The sidecar carries the caller's meta (counters, config hash, metrics) plus the tensor file's
  size and sha256, so a truncated or bit-flipped file is caught on load instead of resuming
  from garbage.
- Saving writes both files as fsynced temp files first and only then renames them into place
  (tensor file, then sidecar, then the pointer). A full disk or a crash while writing leaves the
  earlier checkpoints exactly as they were and no temp files (stale ones from a killed process
  are swept on the next save). A crash between the renames leaves a checkpoint whose sidecar
  does not match, which load rejects and `load_latest_valid` skips.
- Resume must not fail because the newest file is bad: `load_latest_valid` falls back to the
  newest checkpoint that verifies and reports what it skipped so the caller can say so.
- Retention keeps the newest checkpoint (to resume) and the top-k by a metric (for the
  ensemble); the pointer's target is never deleted.

The module knows nothing of the meta-learner: names, tensors and meta are the caller's.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from engine.errors import UserError
from engine.events import json_safe
from engine.run_store import (
    atomic_write_json,
    fsync_dir,
    read_json,
    remove_stale_temps,
    write_temp,
)
from engine.selection import top_k_epochs

# torch is imported where tensors are handled: the CLI's run tables read sidecars and pointers
# through this module, and `mamlpp runs` / `show` must not wait seconds for torch.
if TYPE_CHECKING:
    import torch

LATEST = "latest.json"
TENSOR_EXT = ".safetensors"
SIDECAR_EXT = ".json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# Test hook, off unless set: MAMLPP_TEST_KILL_AT="<point>:<n>" makes the process SIGKILL itself
# the n-th time `save_checkpoint` reaches <point> (tests/test_runs.py resumes from each point).
KILL_POINTS = (
    "tensor-temp",     # the tensor file's temp written and fsynced, the sidecar's not yet
    "temps",           # both temps written and fsynced, nothing renamed
    "tensor-renamed",  # the tensor file in place, its sidecar still a temp
    "renamed",         # both in place, the directory not yet fsynced
    "dir-synced",      # the directory fsynced, latest.json still on the previous checkpoint
    "saved",           # latest.json on the new checkpoint
)
_kill_at = os.environ.get("MAMLPP_TEST_KILL_AT", "").partition(":")
if _kill_at[0] and _kill_at[0] not in KILL_POINTS:
    raise ValueError(f"MAMLPP_TEST_KILL_AT names no point of {KILL_POINTS}: {_kill_at[0]!r}")
_kills_seen = 0


def _test_kill(point: str) -> None:
    global _kills_seen
    if point == _kill_at[0]:
        _kills_seen += 1
        if _kills_seen == int(_kill_at[2] or 1):
            os.kill(os.getpid(), signal.SIGKILL)


class CheckpointError(UserError):
    """A checkpoint cannot be saved or loaded; `reason` is the short why (for skip lists)."""

    def __init__(self, message: str, reason: str | None = None,
                 skipped: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message
        self.skipped = skipped or []


class NoCheckpointError(CheckpointError):
    """The directory holds no checkpoint at all (a run killed before its first save)."""


def epoch_name(epoch: int) -> str:
    """DESIGN.md's name for an end-of-epoch checkpoint: `epoch-0003`."""
    return f"epoch-{epoch:04d}"


def iter_name(iteration: int) -> str:
    """A name for a mid-epoch checkpoint: `iter-00001234`."""
    return f"iter-{iteration:08d}"


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name) or name + SIDECAR_EXT == LATEST:
        raise ValueError(f"invalid checkpoint name {name!r}")


def _paths(directory: Path, name: str) -> tuple[Path, Path]:
    directory = Path(directory)
    return directory / f"{name}{TENSOR_EXT}", directory / f"{name}{SIDECAR_EXT}"


def _prepare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, CPU, contiguous tensors that own their memory (what safetensors needs)."""
    import torch

    out = {}
    for key, value in tensors.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"checkpoint entries must be str -> Tensor, got {key!r}")
        out[key] = value.detach().cpu().clone(memory_format=torch.contiguous_format)
    return out


def save_checkpoint(directory: Path, name: str, tensors: dict[str, torch.Tensor],
                    meta: dict[str, Any], *, update_latest: bool = True) -> Path:
    """Write `<name>.safetensors` and its sidecar atomically; point `latest.json` at it.

    Returns the tensor file's path. On a full disk raises CheckpointError and leaves every
    earlier checkpoint (and the pointer) untouched, with no temp files behind.
    """
    _check_name(name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(directory)
    tensor_path, sidecar_path = _paths(directory, name)
    from safetensors.torch import save as st_save

    data = st_save(_prepare(tensors))
    sidecar = dict(json_safe(meta))
    sidecar.update(file=tensor_path.name, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    temps: list[Path] = []
    try:
        temps.append(write_temp(tensor_path, data))
        _test_kill("tensor-temp")
        temps.append(write_temp(sidecar_path, (_sidecar_text(sidecar) + "\n").encode()))
        _test_kill("temps")
        os.replace(temps[0], tensor_path)
        _test_kill("tensor-renamed")
        os.replace(temps[1], sidecar_path)
        _test_kill("renamed")
        fsync_dir(directory)
        _test_kill("dir-synced")
        if update_latest:
            write_latest(directory, name)
        _test_kill("saved")
    except BaseException as e:
        for tmp in temps:  # already renamed ones are gone; the rest must not linger
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(
                f"No space left on the disk to save checkpoint {name} in {directory}; free some "
                "space and resume the run (the earlier checkpoints are intact).",
                reason="no space left on device",
            ) from e
        raise
    return tensor_path


def _sidecar_text(obj: dict[str, Any]) -> str:
    return json.dumps(json_safe(obj), allow_nan=False, indent=1, sort_keys=True)


def write_latest(directory: Path, name: str) -> None:
    """Atomically point `latest.json` at checkpoint `name`."""
    _check_name(name)
    atomic_write_json(Path(directory) / LATEST, {"name": name, "file": f"{name}{TENSOR_EXT}"})


def read_latest(directory: Path) -> str | None:
    """The checkpoint name `latest.json` points to, or None if absent or unreadable."""
    try:
        name = read_json(Path(directory) / LATEST).get("name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and _NAME_RE.match(name) else None


def read_sidecar(directory: Path, name: str) -> dict[str, Any]:
    """The sidecar of `name`; CheckpointError when missing or corrupt."""
    tensor_path, sidecar_path = _paths(directory, name)
    try:
        sidecar = read_json(sidecar_path)
    except FileNotFoundError:
        if tensor_path.exists():
            raise CheckpointError(f"Checkpoint {name} has no sidecar {sidecar_path.name}.",
                                  reason="sidecar missing (save interrupted)") from None
        raise CheckpointError(f"Checkpoint {name} does not exist in {directory}.",
                              reason="missing") from None
    except ValueError:
        raise CheckpointError(f"Checkpoint {name}'s sidecar {sidecar_path.name} is corrupt.",
                              reason="sidecar is not valid JSON") from None
    if not isinstance(sidecar, dict) or not isinstance(sidecar.get("sha256"), str):
        raise CheckpointError(f"Checkpoint {name}'s sidecar {sidecar_path.name} is corrupt.",
                              reason="sidecar lacks a sha256")
    return sidecar


def load_checkpoint(directory: Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and sidecar meta of `name`, verified by size, sha256 and safetensors parsing."""
    _check_name(name)
    tensor_path, _ = _paths(directory, name)
    meta = read_sidecar(directory, name)

    def bad(reason: str) -> CheckpointError:
        return CheckpointError(f"Checkpoint {tensor_path} is unusable: {reason}.", reason=reason)

    try:
        data = tensor_path.read_bytes()
    except FileNotFoundError:
        raise bad("tensor file missing") from None
    size = meta.get("size")
    if isinstance(size, int) and len(data) < size:
        raise bad(f"truncated ({len(data)} of {size} bytes)")
    if isinstance(size, int) and len(data) != size:
        raise bad(f"wrong size ({len(data)} bytes, expected {size})")
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise bad("sha256 mismatch, the file was modified or corrupted")
    from safetensors.torch import load as st_load

    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError) as e:
        raise bad(f"not a valid safetensors file ({e})") from None
    return tensors, meta


def _order_key(directory: Path, name: str) -> tuple[int, int]:
    """(iteration from the sidecar or -1, newest mtime of the two files) for sorting."""
    tensor_path, sidecar_path = _paths(directory, name)
    iteration = -1
    with contextlib.suppress(OSError, ValueError, AttributeError):
        value = read_json(sidecar_path).get("iteration")
        if isinstance(value, int) and not isinstance(value, bool):
            iteration = value
    mtime = 0
    for p in (tensor_path, sidecar_path):
        with contextlib.suppress(OSError):
            mtime = max(mtime, p.stat().st_mtime_ns)
    return iteration, mtime


def list_checkpoints(directory: Path) -> list[str]:
    """Names of every checkpoint (even incomplete ones), newest first: iteration, then mtime."""
    directory = Path(directory)
    names = set()
    with contextlib.suppress(FileNotFoundError):
        for entry in directory.iterdir():
            for ext in (TENSOR_EXT, SIDECAR_EXT):
                stem = entry.name[: -len(ext)]
                if entry.name.endswith(ext) and entry.name != LATEST and _NAME_RE.match(stem):
                    names.add(stem)
    return sorted(names, key=lambda n: (_order_key(directory, n), n), reverse=True)


def load_latest_valid(
    directory: Path,
) -> tuple[str, dict[str, torch.Tensor], dict[str, Any], list[tuple[str, str]]]:
    """The checkpoint to resume from: the pointer's, else the newest that verifies.

    Returns (name, tensors, meta, skipped) where skipped lists (name, reason) for each
    checkpoint tried and rejected first. Raises NoCheckpointError when there is none at all and
    CheckpointError (with `.skipped`) when none verifies.
    """
    directory = Path(directory)
    names = list_checkpoints(directory)
    pointer = read_latest(directory)
    order = ([pointer] if pointer else []) + [n for n in names if n != pointer]
    if not order:
        raise NoCheckpointError(f"No checkpoint in {directory} yet.", reason="none saved")
    skipped: list[tuple[str, str]] = []
    for name in order:
        try:
            tensors, meta = load_checkpoint(directory, name)
        except CheckpointError as e:
            skipped.append((name, e.reason))
            continue
        return name, tensors, meta, skipped
    details = "; ".join(f"{n}: {r}" for n, r in skipped)
    raise CheckpointError(f"No valid checkpoint in {directory} ({details}).",
                          reason="no valid checkpoint", skipped=skipped)


def _metric(sidecar: dict[str, Any], key: str) -> float | None:
    value: Any = sidecar
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def delete_checkpoint(directory: Path, name: str) -> None:
    """Remove both files of `name` (missing files are fine)."""
    for p in _paths(directory, name):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def prune(directory: Path, keep_top_k: int, metric_key: str = "val_accuracy") -> list[str]:
    """Keep the newest checkpoint, the top-k by `metric_key` and the pointer's; delete the rest.

    `metric_key` is looked up in the sidecar (dots walk into nested dicts); checkpoints without
    a finite value never count as top-k. They are ranked as the ensemble ranks epochs
    (`engine.selection.top_k_epochs`, age standing in for the epoch), so a tie keeps the older
    checkpoint, the one the ensemble picks. Returns deleted names.
    """
    if keep_top_k < 0:
        raise ValueError("keep_top_k must be >= 0")
    directory = Path(directory)
    names = list_checkpoints(directory)  # newest first
    if not names:
        return []
    oldest_first = names[::-1]
    scored = []
    for age, name in enumerate(oldest_first):
        with contextlib.suppress(CheckpointError):
            scored.append({"epoch": age,
                           "accuracy": _metric(read_sidecar(directory, name), metric_key)})
    keep = {names[0]} | {oldest_first[age] for age in top_k_epochs(scored, keep_top_k)}
    pointer = read_latest(directory)
    if pointer:
        keep.add(pointer)
    deleted = [name for name in names if name not in keep]
    for name in deleted:
        delete_checkpoint(directory, name)
    return deleted
