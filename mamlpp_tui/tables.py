"""Rich tables (and their --json twins) for runs, one run, and ensemble results."""

from __future__ import annotations

import time
from typing import Any

from rich.table import Table

from engine import checkpoints as ckpt
from engine.run_store import RunDir


def run_summary(run: RunDir) -> dict[str, Any]:
    """What `mamlpp runs`/`show` report about a run, read from its directory only."""
    config = run.read_config()
    status = run.read_status()
    history = _history(run)
    ensemble = run.read_ensemble()
    train = config.get("train", {})
    best = max(history, key=lambda h: h["accuracy"]) if history else None
    return {
        "id": run.run_id,
        "preset": config.get("name"),
        "state": status.get("state"),
        "error": status.get("error"),
        "pid": status.get("pid"),
        "iteration": status.get("iteration", 0),
        "total_iterations": train.get("epochs", 0) * train.get("iters_per_epoch", 0),
        "epoch": status.get("epoch", 0),
        "epochs": train.get("epochs"),
        "updated": status.get("updated"),
        "best_val_accuracy": best["accuracy"] if best else None,
        "best_val_epoch": best["epoch"] if best else None,
        "val_history": history,
        "ensemble": ensemble,
        "path": str(run.path),
    }


def _history(run: RunDir) -> list[dict[str, Any]]:
    """Validation history from the newest readable checkpoint sidecar."""
    for name in ckpt.list_checkpoints(run.checkpoints_dir):
        try:
            return list(ckpt.read_sidecar(run.checkpoints_dir, name).get("history", []))
        except Exception:
            continue
    return []


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _ago(t: float | None) -> str:
    if not t:
        return "-"
    s = time.time() - t
    if s < 120:
        return f"{s:.0f}s ago"
    return f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.0f}h ago"


def runs_table(summaries: list[dict[str, Any]]) -> Table:
    table = Table(title="runs")
    for col in ("id", "state", "progress", "best val", "ensemble", "updated"):
        table.add_column(col, no_wrap=col != "state")
    for s in summaries:
        ens = s["ensemble"]
        table.add_row(s["id"], s["state"] or "-",
                      f"{s['iteration']}/{s['total_iterations']}",
                      _pct(s["best_val_accuracy"]),
                      _pct(ens["accuracy"]) if ens else "-", _ago(s["updated"]))
    return table


def show_tables(s: dict[str, Any]) -> list[Table]:
    head = Table(title=f"run {s['id']}", show_header=False)
    head.add_column("key", style="bold")
    head.add_column("value")
    for key in ("preset", "state", "error", "pid", "iteration", "total_iterations", "epoch",
                "path"):
        if s[key] is not None:
            head.add_row(key, str(s[key]))
    tables = [head]
    if s["val_history"]:
        val = Table(title="validation")
        for col in ("epoch", "accuracy", "95% CI", "tasks"):
            val.add_column(col)
        for h in s["val_history"]:
            val.add_row(str(h["epoch"]), _pct(h["accuracy"]), f"±{100 * h['ci95']:.2f}",
                        str(h["tasks"]))
        tables.append(val)
    if s["ensemble"]:
        tables.append(ensemble_table(s["ensemble"]))
    return tables


def ensemble_table(result: dict[str, Any]) -> Table:
    table = Table(title=f"ensemble on {result['tasks']} test tasks")
    for col in ("member", "val accuracy", "test accuracy", "95% CI"):
        table.add_column(col)
    vals = result.get("member_val_accuracies") or [None] * len(result["members"])
    cis = result.get("member_ci95") or [None] * len(result["members"])
    for epoch, val, acc, ci in zip(result["members"], vals, result["member_accuracies"], cis):
        table.add_row(f"epoch {epoch}", _pct(val), _pct(acc),
                      "-" if ci is None else f"±{100 * ci:.2f}")
    table.add_row("[bold]ensemble", "", f"[bold]{_pct(result['accuracy'])}",
                  f"[bold]±{100 * result['ci95']:.2f}")
    return table
