"""What `mamlpp compare` says in words: the config keys on which runs differ, and their results.

A key differs when its value is not the same in every run (a key one run lacks counts as
different). Keys are the dotted config keys (`train.meta_lr`) plus `name` (the preset); the
description and the recorded runtime are not config (`rundata.flatten_config`). Results are
the same facts as a report's header, one row per run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mamlpp_tui.report.build import best_validation, duration, pct, value_text
from mamlpp_tui.report.rundata import RunData, flatten_config

_MISSING = object()


def config_differences(datas: Sequence[RunData]) -> list[tuple[str, list[Any]]]:
    """[(key, [value per run])] for every key whose value is not the same in all runs, in the
    order keys first appear; a key a run lacks is None for it."""
    flats = [flatten_config(d.config) for d in datas]
    keys: list[str] = []
    for flat in flats:
        keys += [k for k in flat if k not in keys]
    out = []
    for key in keys:
        values = [flat.get(key, _MISSING) for flat in flats]
        if any(v != values[0] for v in values[1:]):
            out.append((key, [None if v is _MISSING else v for v in values]))
    return out


def result_facts(data: RunData) -> dict[str, Any]:
    """One run's results as numbers (what `mamlpp compare --json` prints)."""
    best = best_validation(data)
    ens = data.ensemble()
    return {
        "run": data.run_id,
        "state": data.state,
        "iteration": data.view.iteration,
        "total_iterations": data.epochs * data.iters_per_epoch,
        "best_val_accuracy": best[1]["accuracy"] if best else None,
        "best_val_ci95": best[1].get("ci95") if best else None,
        "best_val_epoch": best[0] if best else None,
        "ensemble_accuracy": ens["accuracy"] if ens else None,
        "ensemble_ci95": ens.get("ci95") if ens else None,
        "wall_time_s": data.wall_time(),
        "iters_per_sec": data.iters_per_sec(),
    }


def result_row(data: RunData) -> dict[str, str]:
    """One run's results as text cells, keyed as `RESULT_HEADERS`."""
    f = result_facts(data)
    return {
        "run": f["run"],
        "state": f["state"],
        "progress": f"{f['iteration']}/{f['total_iterations']}",
        "best_val": pct(f["best_val_accuracy"], f["best_val_ci95"]),
        "best_epoch": "-" if f["best_val_epoch"] is None else str(f["best_val_epoch"]),
        "ensemble": pct(f["ensemble_accuracy"], f["ensemble_ci95"]),
        "wall_time": duration(f["wall_time_s"]),
        "it_per_s": f"{f['iters_per_sec']:.2f}" if f["iters_per_sec"] else "-",
    }


RESULT_HEADERS = {"run": "run", "state": "state", "progress": "iterations",
                  "best_val": "best val", "best_epoch": "at epoch", "ensemble": "ensemble test",
                  "wall_time": "wall time", "it_per_s": "it/s"}


def runs_table(datas: Sequence[RunData], width: int):
    """Which run is #1, #2, ...: number, whole run id and state."""
    from mamlpp_tui.tables import Column, fitted_table

    columns = [Column("#", identifying=True, justify="right"),
               Column("run", identifying=True), Column("state", identifying=True),
               Column("preset", priority=1)]
    rows = [[str(i), d.run_id, d.state, d.preset] for i, d in enumerate(datas, 1)]
    return fitted_table(columns, rows, width, title="runs")


def _per_run_columns(first: str, n: int):
    from mamlpp_tui.tables import Column

    return [Column(first, identifying=True)] + [
        Column(f"#{i}", wrap=True, min_width=6, priority=n - i) for i in range(1, n + 1)]


def results_table(datas: Sequence[RunData], width: int):
    """The runs' results, one row per result and one column per run (#n as in `runs_table`),
    so any number of runs with long ids fits a terminal; values fold when narrow."""
    from mamlpp_tui.tables import fitted_table

    cells = [result_row(d) for d in datas]
    rows = [[header, *(c[key] for c in cells)] for key, header in RESULT_HEADERS.items()
            if key not in ("run", "state")]
    return fitted_table(_per_run_columns("result", len(datas)), rows, width, title="results",
                        note="a wider terminal or --json shows all")


def differences_table(datas: Sequence[RunData], width: int):
    """A rich table of the config keys that differ: key whole, one column per run (#n as in
    the results table), values folded when narrow. None when every key is the same."""
    from mamlpp_tui.tables import fitted_table

    diff = config_differences(datas)
    if not diff:
        return None
    rows = [[key, *(value_text(v) for v in values)] for key, values in diff]
    return fitted_table(_per_run_columns("key", len(datas)), rows, width,
                        title="config differences", note="a wider terminal or --json shows all")
