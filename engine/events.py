"""The run's event log, `events.jsonl`: the engine appends, the dashboard and CLI tail it.

Why it looks like this:

- One JSON object per line, appended with a single `write` on an `O_APPEND` file, so every
  event lands whole and in order, and a reader can follow the file by byte offset.
- Every line is strict JSON: NaN and infinities (a diverged loss) become `null`, because other
  languages' parsers and `json.loads(..., parse_constant=...)`-free readers reject `NaN`.
- Lines are flushed one by one (no fsync: losing the last events in a power cut is harmless,
  the checkpoint is the source of truth) so a live dashboard sees each event at once.
- `read_events` only returns complete lines: a reader racing the writer never sees half an
  event, and simply picks the rest up on its next call from the returned offset.

After a resume, the engine redoes the iterations since its last checkpoint, so events for those
iterations can appear twice in the file (the first copies came from the killed process). Nothing
here hides that; a reader that wants one value per iteration keeps the last event it saw for each
(`type`, `iteration`) pair.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any


def json_safe(obj: Any) -> Any:
    """A copy of `obj` that `json.dumps(..., allow_nan=False)` accepts.

    NaN and +-inf become None; tuples become lists; dict keys become strings; tensors and numpy
    values become Python numbers or lists (anything with `.tolist()`); paths become strings.
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # torch tensors, numpy arrays and scalars
        return json_safe(obj.tolist())
    return obj  # json.dumps raises TypeError for anything else, which is a caller bug


def dumps(obj: Any) -> str:
    """Strict single-line JSON for `obj` (NaN/inf written as null)."""
    return json.dumps(json_safe(obj), allow_nan=False, separators=(",", ":"))


class EventWriter:
    """Appends events to a JSONL file; one `os.write` per event so lines never interleave."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(
            self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644
        )

    def write(self, type: str, *, iteration: int, epoch: int, **fields: Any) -> dict[str, Any]:
        """Append `{"type", "time", "iteration", "epoch", **fields}` and return it."""
        if self._fd is None:
            raise ValueError(f"EventWriter for {self.path} is closed")
        event = {"type": type, "time": time.time(), "iteration": iteration, "epoch": epoch}
        event.update(fields)
        data = (dumps(event) + "\n").encode()
        view = memoryview(data)
        while view:  # a regular file takes it in one go; loop only for the pathological case
            view = view[os.write(self._fd, view):]
        return event

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_events(path: Path | str, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Complete events from byte `offset` on, and the offset to continue from next time.

    A trailing line without its newline (being written right now) is left for the next call.
    Lines that are not a JSON object (corruption after a crash) are skipped. A missing file
    gives no events; a file shorter than `offset` (replaced) is read again from the start.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < offset:
                offset = 0
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    events = []
    for line in data[:end].split(b"\n"):
        try:
            event = json.loads(line)
        except ValueError:  # includes UnicodeDecodeError and blank lines
            continue
        if isinstance(event, dict):
            events.append(event)
    return events, offset + end + 1
