"""`python -m engine RUN_DIR [--device D]`: the background engine process of one run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.errors import UserError
from engine.run_store import RunDir
from engine.trainer import Trainer


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m engine")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    try:
        state = Trainer(RunDir(args.run_dir), args.device).train()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if state in ("finished", "stopped") else 1


if __name__ == "__main__":
    sys.exit(main())
