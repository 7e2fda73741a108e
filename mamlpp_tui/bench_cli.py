"""`mamlpp bench`: speed and memory of the engine on synthetic tasks shaped like a preset.

This module imports nothing heavy at import time (the CLI registers it on every start); torch
and the engine come in when the command runs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from engine.errors import UserError
from mamlpp_tui.options import Device


def _choices(value: str, allowed: tuple[str, str], option: str) -> list[str]:
    if value == "both":
        return list(allowed)
    if value not in allowed:
        raise UserError(f"{option} must be {allowed[0]}, {allowed[1]} or both (got {value!r}).")
    return [value]


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _table(report: dict, width: int):
    from mamlpp_tui.tables import Column, fitted_table

    device = report["device"]
    title = f"mamlpp bench on {device['device']}: {device['cpu_model']}"
    if device.get("gpu"):
        title += f", {device['gpu']['name']}"
    # s/it: median seconds per meta-iteration; %mm: achieved FLOP/s as % of a float32 matmul;
    # wait%: share of the step spent waiting for data; GiB: peak memory of the phase.
    columns = [Column("preset", identifying=True), Column("impl", identifying=True),
               Column("order", identifying=True)] + [
        Column(name, priority=priority, justify="right") for name, priority in (
            ("s/it", 10), ("cpu s/it", 3), ("GF/it", 2), ("%mm", 1), ("wait%", 4),
            ("train GiB", 8), ("eval task/s", 7), ("eval GiB", 6))]
    cuda = device["device"].startswith("cuda")
    rows = []
    for row in report["rows"]:
        if "error" in row:
            rows.append([row["preset"], row["impl"], row["order"], "[red]failed[/]",
                         *[""] * 7])
            continue
        peak = row["cuda_peak_gib"] if cuda else row["train_peak_rss_gib"]
        rows.append([
            row["preset"], row["impl"], row["order"], _num(row["s_per_iter"], ".3f"),
            _num(row["cpu_s_per_iter"], ".3f"), _num(row["gflops_per_iter"], ".1f"),
            _num(None if row["matmul_fraction"] is None else 100 * row["matmul_fraction"],
                 ".1f"),
            _num(100 * row["data_wait_fraction"], ".2f"), _gib(peak),
            _num(row["eval_tasks_per_s"], ".1f"), _gib(row["eval_peak_rss_gib"]),
        ])
    return fitted_table(columns, rows, width, title=title)


def _errors(report: dict) -> list[str]:
    return [f"{row['preset']} {row['impl']} {row['order']} order failed: {row['error']}"
            for row in report["rows"] if "error" in row]


def bench(
    preset: list[str] = typer.Option(
        [], "--preset", "-p",
        help="Preset to measure (repeat for several; `paper` = the six paper presets). "
             "Default: quickstart."),
    impl: str = typer.Option(
        "all", "--impl",
        help="auto (the engine's default path), plain (per-task loop, no task threads or "
             "channels-last), loop, vmap; comma-separated, both (loop,vmap) or all."),
    device: Device = "auto",
    order: str = typer.Option("both", "--order", help="first, second or both."),
    iters: int = typer.Option(None, "--iters", min=1,
                              help="Timed iterations per phase (default 3 for mini-ImageNet, "
                                   "5 otherwise)."),
    warmup: int = typer.Option(1, "--warmup", min=0, help="Untimed iterations first."),
    eval_tasks: int = typer.Option(50, "--eval-tasks", min=0,
                                   help="Validation tasks to time (0 skips evaluation)."),
    threads: int = typer.Option(None, "--threads", min=1, help="torch intra-op threads."),
    memory_cap: float = typer.Option(None, "--memory-cap", min=0.1,
                                     help="GiB each measuring process may allocate (Linux)."),
    set_: list[str] = typer.Option([], "--set", "-s",
                                   help="Config override for every preset: section.key=value."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    out: Path = typer.Option(None, "--out", help="Also write the JSON report to this file."),
    whole_run: bool = typer.Option(
        False, "--whole-run",
        help="Estimate each preset's whole schedule (first-order epochs, then second order, "
             "validation every epoch, the ensemble) from its timed phases, next to the "
             "reference code's schedule (second order throughout); default path only."),
) -> None:
    """Measure seconds per meta-iteration, validation speed, peak memory, FLOP/s and data
    waits on synthetic tasks shaped like each preset (no data set needed)."""
    from engine.bench import BenchOptions, parse_impls, run_bench, write_report

    if whole_run:
        _whole_run(list(preset) or ["quickstart"], list(set_), device, iters, eval_tasks,
                   as_json, out)
        return

    options = BenchOptions(
        presets=list(preset) or ["quickstart"],
        impls=parse_impls(impl),
        orders=_choices(order, ("first", "second"), "--order"),
        device=device, iters=iters, warmup=warmup, eval_tasks=eval_tasks, threads=threads,
        overrides=list(set_),
        memory_cap_bytes=int(memory_cap * 2**30) if memory_cap else None,
    )

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    report = run_bench(options, progress=progress)
    if out is not None:
        write_report(report, out)
        progress(f"wrote {out}")
    if as_json:
        print(json.dumps(report, indent=2))
        return
    from rich.console import Console

    # a file gets the whole table (160 columns) unless COLUMNS says how wide
    wide = sys.stdout.isatty() or "COLUMNS" in os.environ
    console = Console(width=None if wide else 160)
    console.print(_table(report, console.width))
    for line in _errors(report):
        console.print(line, markup=False, highlight=False)


def _whole_run(presets: list[str], overrides: list[str], device: str, iters: int | None,
               eval_tasks: int, as_json: bool, out: Path | None) -> None:
    from engine.bench import expand_presets, resolve_device, write_report
    from engine.whole_run import measure_whole_run

    if eval_tasks < 1:
        raise UserError("--whole-run needs --eval-tasks of at least 1 (validation is timed).")
    device = resolve_device(device)
    reports = [measure_whole_run(name, overrides, device, iters, eval_tasks,
                                 lambda m: print(m, file=sys.stderr, flush=True))
               for name in expand_presets(presets)]
    report = {"schema": "mamlpp-whole-run/1", "runs": reports}
    if out is not None:
        write_report(report, out)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    from rich.console import Console

    console = Console()
    for r in reports:
        ours, ref = r["schedule"], r["reference_schedule"]
        console.print(f"{r['preset']}: whole run {ours['total_hours']:.1f} h "
                      f"(training {ours['training_s'] / 3600:.1f} h, validation "
                      f"{ours['validation_s'] / 3600:.1f} h, ensemble "
                      f"{ours['ensemble_s'] / 60:.0f} min); with the reference code's schedule "
                      f"(second order throughout) {ref['total_hours']:.1f} h", markup=False,
                      highlight=False)
        for phase in r["phases"]:
            console.print(f"  {phase['phase']}: {phase['s_per_iter']:.3f} s/iteration",
                          markup=False, highlight=False)
        console.print(f"  validation: {r['validation']['s_per_task']:.4f} s/task",
                      markup=False, highlight=False)
