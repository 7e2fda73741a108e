"""Variants of one step timed in turns in one process: this machine's speed drifts between
minutes by more than the differences measured, and alternating cancels it."""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def alternate(step: Callable[[str, object], None], names: list[str], sampler, meta_batch: int,
              rounds: int) -> dict[str, list[float]]:
    """Seconds of `step(name, batch)` per name and round: one untimed warm-up batch each, then
    every round's batch through every name, the order reversed every other round."""
    warm = sampler.batch(0, meta_batch)
    for name in names:
        step(name, warm)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        batch = sampler.batch((r + 1) * meta_batch, meta_batch)
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            step(name, batch)
            seconds[name].append(time.perf_counter() - t0)
    return seconds


def median_speedup(seconds: dict[str, list[float]], base: str, name: str) -> float:
    """The median over rounds of base's time over name's: > 1 when `name` is faster."""
    return statistics.median(a / b for a, b in zip(seconds[base], seconds[name]))


def child_json(argv: list[str], cwd: str | Path, env: dict[str, str] | None = None) -> dict:
    """What a fresh process measured: runs `argv --child-out FILE` in `cwd` and returns the JSON
    it wrote to FILE (its stdout is free for progress; a failure raises with its stderr)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "child.json"
        subprocess.run([*argv, "--child-out", str(out)], check=True, capture_output=True,
                       text=True, cwd=cwd, env=env)
        return json.loads(out.read_text())
