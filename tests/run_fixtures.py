"""Helpers for tests that drive real runs through the CLI and the engine process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

# A whole quickstart run in a few seconds: 3 epochs x 4 iterations, a tiny net.
TINY = [
    "train.epochs=3", "train.iters_per_epoch=4", "train.meta_batch=4", "model.filters=32",
    "train.inner_steps=2", "train.eval_inner_steps=2", "maml_pp.msl_epochs=1",
    "maml_pp.first_order_epochs=1", "eval.val_tasks=10", "eval.test_tasks=12",
]


def sets(*overrides: str) -> list[str]:
    out = []
    for o in (*TINY, *overrides):
        out += ["--set", o]
    return out


def mamlpp(home: Path, *args: str, timeout: float = 180,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`mamlpp ARGS` in a fresh process under MAMLPP_HOME=home, `env` added to the environment."""
    env = dict(os.environ, MAMLPP_HOME=str(home), **(env or {}))
    return subprocess.run([sys.executable, "-m", "mamlpp_tui", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def run_dir(home: Path, run_id: str) -> Path:
    return home / "runs" / run_id


def status(home: Path, run_id: str) -> dict:
    """status.json, or {} while the run directory is still being created."""
    try:
        return json.loads((run_dir(home, run_id) / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def events(home: Path, run_id: str) -> list[dict]:
    lines = (run_dir(home, run_id) / "events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def story(home: Path, run_id: str, lines: int = 40) -> str:
    """The run's status and the end of its engine.log, for assertion messages: a run that
    fails in the background leaves its reason there, not in the test's output."""
    try:
        log = (run_dir(home, run_id) / "engine.log").read_text().splitlines()[-lines:]
    except OSError:
        log = ["(no engine.log)"]
    return f"status: {status(home, run_id)}\nengine.log:\n" + "\n".join(log)


def final_tensors(home: Path, run_id: str) -> dict:
    ckpts = run_dir(home, run_id) / "checkpoints"
    name = json.loads((ckpts / "latest.json").read_text())["name"]
    return load_file(ckpts / f"{name}.safetensors")


def wait_for(predicate, timeout: float = 60.0, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False
