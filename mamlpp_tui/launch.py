"""Start the engine as a background process that outlives the terminal."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from engine.errors import UserError
from engine.run_store import RunDir


def start_engine(run: RunDir, device: str, wait_s: float = 30.0) -> int:
    """Spawn `python -m engine RUN_DIR` in its own session (no terminal signals reach it) and
    wait until it holds the run's lock, so a `pause` right after `run --detach` is not lost."""
    log = open(run.log_path, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", str(run.path), "--device", device],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True, env=dict(os.environ),
    )
    log.close()
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if run.is_locked() and run.read_raw_status().get("pid") == proc.pid:
            return proc.pid
        code = proc.poll()
        if code is not None:
            status = run.read_raw_status()
            error = status.get("error") or _last_line(run)
            raise UserError(f"The engine for {run.run_id} exited at once (code {code}): {error}")
        time.sleep(0.05)
    return proc.pid


def _last_line(run: RunDir) -> str:
    try:
        lines = [ln for ln in run.log_path.read_text().splitlines() if ln.strip()]
    except OSError:
        return "see engine.log"
    return lines[-1].removeprefix("error: ") if lines else "see engine.log"
