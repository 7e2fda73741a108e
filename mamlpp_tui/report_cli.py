"""`mamlpp report` and `mamlpp compare`: report folders and terminal comparisons of runs.

The work lives in `mamlpp_tui/report/`; this module only parses arguments, finds runs, and
prints where things went. matplotlib is imported when a figure is drawn, not when the CLI
starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from engine.errors import UserError
from mamlpp_tui.options import AsJson
from mamlpp_tui.terminal import console

Out = Annotated[Path | None, typer.Option(
    "--out", help="Folder to write the report into (made if missing).")]


def _open_in_browser(index: Path) -> None:
    import webbrowser

    if not webbrowser.open(index.resolve().as_uri()):
        console.print("no browser found to open it; open the file above yourself")


def report(
    target: Annotated[str, typer.Argument(metavar="RUN|STUDY",
                                          help="Run or study id, or a unique prefix.")],
    out: Out = None,
    open_: Annotated[bool, typer.Option("--open", help="Open index.html in a browser.")] = False,
) -> None:
    """Write a report folder for a run or a study: index.html and PNG/SVG figures, offline.

    Any run state works (running, stopped, crashed: it shows what the events hold so far).
    Default folder: the run's or study's own report/."""
    from mamlpp_tui.study_cli import run_or_study

    run, study = run_or_study(target)
    if run is not None:
        from mamlpp_tui.report.build import write_run_report
        from mamlpp_tui.report.rundata import load_run

        index = write_run_report(load_run(run), out or run.path / "report")
        what = f"run {run.run_id}"
    else:
        from mamlpp_tui.report.study import write_study_report

        index = write_study_report(study, out or study.path / "report")
        what = f"study {study.id}"
    console.print(f"report of {what}: {index}", highlight=False, soft_wrap=True)
    if open_:
        _open_in_browser(index)


def _distinct_runs(refs: list[str]):
    from engine.run_store import find_run

    runs = [find_run(ref) for ref in refs]
    seen: set[str] = set()
    for run in runs:
        if run.run_id in seen:
            raise UserError(f"Run {run.run_id} is given twice; compare different runs.")
        seen.add(run.run_id)
    if len(runs) < 2:
        raise UserError("Give at least two runs to compare (run ids or unique prefixes).")
    return runs


def compare(
    refs: Annotated[list[str], typer.Argument(metavar="RUN RUN...",
                                              help="Two or more run ids or unique prefixes.")],
    out: Out = None,
    open_: Annotated[bool, typer.Option("--open", help="With --out: open index.html.")] = False,
    as_json: AsJson = False,
) -> None:
    """Compare runs: results and config differences, or with --out a report of them overlaid."""
    from mamlpp_tui.report.compare import (
        config_differences,
        differences_table,
        result_facts,
        results_table,
        runs_table,
    )
    from mamlpp_tui.report.rundata import load_run

    if open_ and out is None:
        raise UserError("--open opens a report folder; give --out DIR too.")
    datas = [load_run(run) for run in _distinct_runs(refs)]
    if out is not None:
        from mamlpp_tui.report.build import write_compare_report

        index = write_compare_report(datas, out)
        console.print(f"comparison of {len(datas)} runs: {index}", highlight=False,
                      soft_wrap=True)
        if open_:
            _open_in_browser(index)
        return
    if as_json:
        print(json.dumps({
            "runs": [d.run_id for d in datas],
            "differences": {k: v for k, v in config_differences(datas)},
            "results": [result_facts(d) for d in datas],
        }, indent=2))
        return
    console.print(runs_table(datas, console.width))
    console.print(results_table(datas, console.width))
    diff = differences_table(datas, console.width)
    if diff is None:
        console.print("the runs have the same config")
    else:
        console.print(diff)
