"""Rich tables (and their --json twins) for runs, one run, and ensemble results, and
`fitted_table`, the helper every table a command prints should be built with."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from engine import checkpoints as ckpt
from engine.run_store import RunDir

WIDER_NOTE = "a wider terminal or --json shows all"
FOLDED_WIDTH = 10  # what an identifying column folded over lines is counted as when fitting


@dataclass(frozen=True)
class Column:
    """One column of a `fitted_table`.

    header       the heading.
    identifying  what names a row (preset name, run id, state, dataset, split, member): always
                 shown, whole, on one line (as wide as its longest cell); when the identifying
                 columns alone are wider than the terminal, the widest of them fold over lines
                 (never cut) and the others stay whole.
    priority     for the other columns: when a row does not fit, the column with the lowest
                 priority is dropped first (ties: the rightmost), and a caption names what was
                 dropped. Give what a reader most needs the highest number.
    wrap         True for prose (descriptions, paths, errors): the column may narrow down to
                 `min_width`, wrapping at spaces and folding longer words. False (numbers,
                 short values): the column keeps its longest cell whole, or is dropped.
    """

    header: str
    identifying: bool = False
    priority: int = 0
    wrap: bool = False
    min_width: int = 16
    justify: str = "left"
    style: str | None = None


def _cell_width(cell: str) -> int:
    text = Text.from_markup(cell) if isinstance(cell, str) else Text(str(cell))
    return max((Text(line).cell_len for line in text.plain.split("\n")), default=0)


def _overhead(n_columns: int) -> int:
    """Characters a rich Table with the default box and padding adds: a border left, right and
    between columns, and one space each side of every cell."""
    return 3 * n_columns + 1


def fitted_table(columns: Sequence[Column], rows: Sequence[Sequence[str] | None], width: int,
                 *, title: str | None = None, show_header: bool = True,
                 note: str = WIDER_NOTE) -> Table:
    """A rich Table that fits `width` terminal columns without cutting what identifies a row.

    Use it for every table a command prints (pass `console.width`): identifying columns stay
    whole at any width, prose columns wrap, and when the row is still too wide the
    lowest-priority columns are dropped with a caption naming them and `note` (say how to see
    everything: the default suits a command with --json). Nothing ever shrinks to width 0 or
    to `…`. `rows` hold strings, one per column (rich markup allowed; a newline starts another
    line in the cell); a None between rows draws a section line. Example:

        table = fitted_table([Column("study", identifying=True), Column("state",
                              identifying=True), Column("runs", priority=2),
                              Column("description", wrap=True, priority=1)],
                             rows, console.width, title="studies")
        console.print(table)
    """
    need = []
    for i, col in enumerate(columns):
        cells = [_cell_width(r[i]) for r in rows if r is not None]
        need.append(max([_cell_width(col.header) if show_header else 0, *cells, 1]))

    def least(i: int) -> int:
        col = columns[i]
        return min(need[i], max(col.min_width, 1)) if col.wrap and not col.identifying \
            else need[i]

    keep = list(range(len(columns)))
    while sum(least(i) for i in keep) + _overhead(len(keep)) > width:
        droppable = [i for i in keep if not columns[i].identifying]
        if not droppable:
            break
        keep.remove(min(droppable, key=lambda i: (columns[i].priority, -i)))
    # identifying columns that are still too wide together: the widest fold over lines (never
    # cut), as few of them as lets the others stay whole
    folded: set[int] = set()
    for i in sorted((i for i in keep if columns[i].identifying), key=lambda i: -need[i]):
        if sum(FOLDED_WIDTH if j in folded else least(j) for j in keep) \
                + _overhead(len(keep)) <= width:
            break
        folded.add(i)
    dropped = [columns[i].header for i in range(len(columns)) if i not in keep]
    caption = f"not shown: {', '.join(dropped)} ({note})" if dropped else None
    table = Table(title=title, caption=caption, caption_justify="left",
                  show_header=show_header)
    for i in keep:
        col = columns[i]
        if i in folded:
            table.add_column(col.header, overflow="fold", justify=col.justify, style=col.style)
        elif col.wrap and not col.identifying:
            table.add_column(col.header, overflow="fold", min_width=least(i),
                             justify=col.justify, style=col.style)
        else:
            table.add_column(col.header, no_wrap=True, min_width=need[i], justify=col.justify,
                             style=col.style)
    previous: list[str] | None = None
    for row in rows:
        if row is None:
            if previous is not None:
                table.rows[-1].end_section = True
            continue
        previous = [row[i] for i in keep]
        table.add_row(*previous)
    return table


def console_width(console: Console | None = None) -> int:
    return (console or Console()).width


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


def runs_table(summaries: list[dict[str, Any]], width: int | None = None) -> Table:
    rows = []
    for s in summaries:
        ens = s["ensemble"]
        rows.append([s["id"], s["state"] or "-", f"{s['iteration']}/{s['total_iterations']}",
                     _pct(s["best_val_accuracy"]), _pct(ens["accuracy"]) if ens else "-",
                     _ago(s["updated"])])
    return fitted_table(
        [Column("id", identifying=True), Column("state", identifying=True),
         Column("progress", priority=5), Column("best val", priority=4),
         Column("ensemble", priority=3), Column("updated", priority=1)],
        rows, width or console_width(), title="runs")


def show_tables(s: dict[str, Any], width: int | None = None) -> list[Table]:
    width = width or console_width()
    rows = [[key, str(s[key])] for key in ("preset", "state", "error", "pid", "iteration",
                                            "total_iterations", "epoch", "path")
            if s[key] is not None]
    head = fitted_table([Column("key", identifying=True, style="bold"),
                         Column("value", wrap=True, min_width=20, priority=1)],
                        rows, width, title=f"run {s['id']}", show_header=False)
    tables = [head]
    if s["val_history"]:
        rows = [[str(h["epoch"]), _pct(h["accuracy"]), f"±{100 * h['ci95']:.2f}",
                 str(h["tasks"])] for h in s["val_history"]]
        tables.append(fitted_table(
            [Column("epoch", identifying=True), Column("accuracy", priority=3),
             Column("95% CI", priority=2), Column("tasks", priority=1)],
            rows, width, title="validation"))
    if s["ensemble"]:
        tables.append(ensemble_table(s["ensemble"], width))
    return tables


def ensemble_table(result: dict[str, Any], width: int | None = None) -> Table:
    vals = result.get("member_val_accuracies") or [None] * len(result["members"])
    cis = result.get("member_ci95") or [None] * len(result["members"])
    rows = []
    for epoch, val, acc, ci in zip(result["members"], vals, result["member_accuracies"], cis):
        rows.append([f"epoch {epoch}", _pct(val), _pct(acc),
                     "-" if ci is None else f"±{100 * ci:.2f}"])
    rows.append(["[bold]ensemble", "", f"[bold]{_pct(result['accuracy'])}",
                 f"[bold]±{100 * result['ci95']:.2f}"])
    return fitted_table(
        [Column("member", identifying=True), Column("val accuracy", priority=2),
         Column("test accuracy", priority=4), Column("95% CI", priority=3)],
        rows, width or console_width(), title=f"ensemble on {result['tasks']} test tasks")


def presets_table(configs: list[Any], width: int | None = None) -> Table:
    """`mamlpp presets`: one row per preset (engine.config.Config objects)."""
    rows = [[c.name, c.data.dataset, str(c.data.ways), str(c.data.shots), str(c.data.queries),
             str(c.train.meta_batch), str(c.train.epochs), c.description] for c in configs]
    return fitted_table(
        [Column("name", identifying=True), Column("dataset", priority=7),
         Column("ways", priority=6), Column("shots", priority=6), Column("queries", priority=5),
         Column("meta_batch", priority=2), Column("epochs", priority=1),
         Column("description", wrap=True, priority=4)],
        rows, width or console_width(), title="presets",
        note="`mamlpp presets NAME` or --json shows all")
