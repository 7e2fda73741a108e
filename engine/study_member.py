"""`python -m engine.study_member RUN_DIR --parent PID [--device D]`: one member run of a study.

The same engine as `python -m engine`, plus one duty: when the study process that started it
dies (even by SIGKILL), the member checkpoints and stops at its next iteration instead of going
on alone. A watcher thread notices the parent's death (our parent pid changes) and sends `stop`
through control.json, the channel the engine already obeys between iterations, so the stop
always lands on an iteration boundary and the run resumes exactly. It keeps sending until the
engine exits, so a stop sent before the engine's control reader exists is not lost.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
from pathlib import Path

from engine.errors import UserError
from engine.run_store import RunDir

WATCH_S = 0.5
RESEND_S = 2.0


def stop_when_orphaned(run: RunDir, parent: int) -> threading.Thread:
    """Start the daemon thread that stops the run once `parent` is no longer our parent."""

    def watch() -> None:
        from engine import control

        while os.getppid() == parent:
            time.sleep(WATCH_S)
        while True:
            with contextlib.suppress(Exception):
                control.send(run, "stop")
            time.sleep(RESEND_S)

    thread = threading.Thread(target=watch, name="study-parent-watch", daemon=True)
    thread.start()
    return thread


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.study_member")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    run = RunDir(args.run_dir)
    stop_when_orphaned(run, args.parent)
    from engine.trainer import Trainer

    try:
        state = Trainer(run, args.device).train()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if state in ("finished", "stopped") else 1


if __name__ == "__main__":
    sys.exit(main())
