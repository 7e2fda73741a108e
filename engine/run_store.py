"""The run directory `<root>/runs/<run_id>/` and the durable-file primitives the engine uses.

The CLI, the dashboard and the engine share nothing but these files, so:

- Whole-file writes (`config.json`, `status.json`, pointers) are atomic: a temp file in the same
  directory, fsync, `os.replace`, fsync of the directory. A reader sees the old or the new file,
  never a mix, even after a crash or power cut.
- One engine per run: `acquire_lock` takes an `fcntl.flock` on `engine.lock` for the life of the
  process. The kernel drops it when the process dies, even by SIGKILL, so a crash never leaves
  a stale lock behind. (A child made by a bare `fork` inherits the lock; such children must not
  outlive the engine.)
- `read_status` reports the truth: `status.json` says "running" forever if the engine was killed,
  so a running/paused state whose lock is free or whose pid is gone reads as "failed".

This module is deliberately free of torch so that `mamlpp runs` / `pause` stay fast.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import process_lock
from engine.errors import UserError
from engine.events import dumps
from engine.paths import runs_root

STATES = ("running", "paused", "stopped", "finished", "failed")
_LIVE_STATES = ("running", "paused")
_TEMP_RE = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]+$")


# ---------------------------------------------------------------- durable file primitives


def fsync_dir(directory: Path) -> None:
    """Make a rename/unlink in `directory` durable (some filesystems cannot; that is fine)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def write_temp(path: Path, data: bytes) -> Path:
    """Write `data` to a fresh temp file next to `path`, fsynced; return the temp path.

    On any failure (ENOSPC included) the temp file is removed before the error propagates.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably."""
    path = Path(path)
    tmp = write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write `obj` as strict JSON (NaN/inf become null)."""
    atomic_write_bytes(path, (dumps(obj) + "\n").encode())


def read_json(path: Path) -> Any:
    """The parsed JSON at `path`; raises FileNotFoundError or ValueError (corrupt)."""
    with open(path, "rb") as f:
        return json.loads(f.read())


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this pid exists (a zombie counts as alive)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete temp files left in `directory` by writers that died mid-write."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in Path(directory).iterdir():
            m = _TEMP_RE.match(entry.name)
            if m and not pid_alive(int(m.group(1))):
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
                    removed.append(entry)
    return removed


# ---------------------------------------------------------------- run ids and lookup


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return slug or "run"


def new_run_id(preset_name: str) -> str:
    """`<preset>-<YYYYmmdd>-<HHMMSS>-<4 hex>`: sorts by time per preset, readable, unique."""
    return f"{_slug(preset_name)}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def create_run(config_dict: dict[str, Any], name: str | None = None) -> RunDir:
    """Make a new run directory holding the resolved config and a "stopped" status.

    `name` (the CLI's `--name`) replaces the preset name at the front of the id, so a run can
    be found again by that prefix. The directory is created with `mkdir` (no `exist_ok`), so two
    simultaneous creations can never share a directory.
    """
    root = runs_root()
    root.mkdir(parents=True, exist_ok=True)
    prefix = name or str(config_dict.get("name") or "run")
    for _ in range(100):
        run = RunDir(root / new_run_id(prefix))
        try:
            run.path.mkdir()
        except FileExistsError:
            continue
        break
    else:  # pragma: no cover - 100 collisions of 16 random bits in one second
        raise UserError(f"Could not create a unique run directory in {root}; try again.")
    run.checkpoints_dir.mkdir()
    atomic_write_json(run.config_path, config_dict)
    run.events_path.touch()
    run.write_status(state="stopped", pid=None, iteration=0, epoch=0, error=None)
    return run


def list_runs() -> list[RunDir]:
    """Every run under the runs root, oldest first (config.json's mtime, then the id)."""
    root = runs_root()
    runs = []
    with contextlib.suppress(FileNotFoundError):
        for entry in root.iterdir():
            cfg = entry / "config.json"
            if entry.is_dir() and cfg.is_file():
                runs.append((cfg.stat().st_mtime_ns, entry.name, RunDir(entry)))
    return [r for _, _, r in sorted(runs, key=lambda t: t[:2])]


def find_run(ref: str) -> RunDir:
    """The run whose id is `ref` or starts with `ref`; a UserError if none or several match."""
    runs = list_runs()
    ref = ref.strip()
    if not ref:
        raise UserError("Give a run id or a prefix of one; list runs with `mamlpp runs`.")
    for run in runs:
        if run.run_id == ref:
            return run
    matches = [run for run in runs if run.run_id.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UserError(f"No run matches {ref!r}; list runs with `mamlpp runs`.")
    names = ", ".join(run.run_id for run in matches)
    raise UserError(f"Run {ref!r} is ambiguous, it matches {names}; give more of the id.")


# ---------------------------------------------------------------- one run directory


@dataclass(frozen=True)
class RunDir:
    """Paths of one run and the operations on its status, config and lock."""

    path: Path

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def status_path(self) -> Path:
        return self.path / "status.json"

    @property
    def events_path(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def control_path(self) -> Path:
        return self.path / "control.json"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def ensemble_path(self) -> Path:
        return self.path / "ensemble.json"

    @property
    def log_path(self) -> Path:
        return self.path / "engine.log"

    @property
    def lock_path(self) -> Path:
        return self.path / "engine.lock"

    # -- config

    def read_config(self) -> dict[str, Any]:
        try:
            return read_json(self.config_path)
        except FileNotFoundError:
            raise UserError(f"Run {self.run_id} has no config.json; it cannot be used.") from None
        except ValueError:
            raise UserError(f"Run {self.run_id} has a corrupt config.json.") from None

    # -- status

    def read_raw_status(self) -> dict[str, Any]:
        """status.json as written (empty dict when missing or unreadable)."""
        try:
            status = read_json(self.status_path)
        except (FileNotFoundError, ValueError):
            return {}
        return status if isinstance(status, dict) else {}

    def write_status(self, **fields: Any) -> dict[str, Any]:
        """Merge `fields` into status.json, stamp `updated`, write atomically; return it."""
        state = fields.get("state")
        if state is not None and state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {state!r}")
        status = {"state": None, "pid": None, "iteration": 0, "epoch": 0, "error": None}
        status.update(self.read_raw_status())
        status.update(fields)
        status["updated"] = time.time()
        atomic_write_json(self.status_path, status)
        return status

    def read_status(self) -> dict[str, Any]:
        """status.json corrected to the truth; a live state with no live engine is "failed".

        The file is not rewritten (readers must not race the engine); `reconcile_status` does.
        """
        status = self.read_raw_status()
        if status.get("state") in _LIVE_STATES:
            pid = status.get("pid")
            if not self.is_locked() or (pid is not None and not pid_alive(pid)):
                status = dict(status, state="failed",
                              error=f"engine process {pid} is no longer running")
        return status

    def reconcile_status(self) -> dict[str, Any]:
        """Persist `read_status`'s correction when the engine died; return the status."""
        status = self.read_status()
        if status != self.read_raw_status() and not self.is_locked():
            status = self.write_status(state=status["state"], error=status["error"])
        return status

    # -- lock

    def acquire_lock(self, wait: float = 0.5) -> None:
        """Hold `engine.lock` for the rest of this process's life; UserError if another has it."""
        process_lock.hold(self.lock_path, lambda pid: (
            f"Run {self.run_id} is already running (pid {pid}); stop it with "
            f"`mamlpp stop {self.run_id}` first."), wait)

    def release_lock(self) -> None:
        """Give the lock back early (normally process exit does it)."""
        process_lock.release(self.lock_path)

    def is_locked(self) -> bool:
        """Whether some engine process (this one included) holds the run's lock right now."""
        return process_lock.is_held(self.lock_path)

    def lock_holder_pid(self) -> int | None:
        """The pid the lock holder wrote into `engine.lock` (None if unknown)."""
        return process_lock.holder_pid(self.lock_path)

    # -- ensemble result

    def write_ensemble(self, result: dict[str, Any]) -> None:
        atomic_write_json(self.ensemble_path, result)

    def read_ensemble(self) -> dict[str, Any] | None:
        try:
            return read_json(self.ensemble_path)
        except (FileNotFoundError, ValueError):
            return None
