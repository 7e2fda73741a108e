"""Commands from the CLI or dashboard to a running engine, through `control.json`.

Why it looks like this:

- The engine only reads files between iterations, so commands are queued in a file rather than
  sent over a socket; a dashboard on a remote mount works the same.
- `control.json` holds a short list of pending commands, each with an increasing id
  (`time.time_ns()`, bumped past the previous id). Senders read-modify-write it under an
  `flock` on `control.lock`, so two quick sends (a `pause` then a `stop`) are both kept; the
  write itself is atomic, so the engine, which reads without the lock, never sees half a file.
- The engine remembers the last id it handled (`ControlReader`) and so runs each command once.
  Old entries are trimmed to the last `KEEP` commands; nothing needs deleting them otherwise.
- A reader starts past the commands already in the file (`skip_pending=True`): a `stop` sent to
  an engine that has since died must not stop the next `resume`. The engine should create its
  reader right after taking the run lock and before writing state "running"; a CLI that only
  sends to runs whose status is running/paused then never loses a command.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.run_store import atomic_write_json, read_json

COMMANDS = ("pause", "unpause", "stop", "checkpoint")
KEEP = 32


def _run_path(run_dir: Any) -> Path:
    """Accept a RunDir or a plain path to the run directory."""
    return Path(getattr(run_dir, "path", run_dir))


def _read_commands(path: Path) -> list[dict[str, Any]]:
    try:
        data = read_json(path)
    except (FileNotFoundError, ValueError):
        return []
    commands = data.get("commands") if isinstance(data, dict) else None
    if not isinstance(commands, list):
        return []
    return [c for c in commands if isinstance(c, dict) and isinstance(c.get("id"), int)
            and c.get("command") in COMMANDS]


def send(run_dir: Any, command: str) -> int:
    """Queue `command` for the run's engine; returns the command's id."""
    if command not in COMMANDS:
        raise UserError(f"Unknown command {command!r}; use one of {', '.join(COMMANDS)}.")
    root = _run_path(run_dir)
    fd = os.open(root / "control.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held for milliseconds by other senders only
        commands = _read_commands(root / "control.json")
        last = max((c["id"] for c in commands), default=0)
        entry = {"id": max(time.time_ns(), last + 1), "command": command, "time": time.time()}
        commands = (commands + [entry])[-KEEP:]
        atomic_write_json(root / "control.json", {"commands": commands})
    finally:
        os.close(fd)
    return entry["id"]


class ControlReader:
    """The engine's side: `poll()` returns commands it has not seen yet, oldest first."""

    def __init__(self, run_dir: Any, skip_pending: bool = True) -> None:
        self.path = _run_path(run_dir) / "control.json"
        self.last_id = 0
        if skip_pending:
            self.last_id = max((c["id"] for c in _read_commands(self.path)), default=0)

    def poll(self) -> list[str]:
        new = sorted((c for c in _read_commands(self.path) if c["id"] > self.last_id),
                     key=lambda c: c["id"])
        if new:
            self.last_id = new[-1]["id"]
        return [c["command"] for c in new]
