"""Writes report folders: `index.html` plus every figure as PNG and SVG.

`write_run_report` (one run), `write_compare_report` (runs overlaid) and
`write_study_report` (a study's variants) each return the path of the `index.html` they wrote.
Figures are saved at the fixed size their `Plot` was drawn at; a figure that is missing this
time (say, validation of a run that has none yet) also loses its file from an earlier report in
the same folder, so the folder never shows stale pictures.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mamlpp_tui.report import html
from mamlpp_tui.report.figures import DPI, Plot
from mamlpp_tui.report.rundata import RunData, number

SVG_METADATA = {"Date": None, "Creator": "mamlpp report"}
PNG_METADATA = {"Software": "mamlpp report"}


def save_plots(plots: Sequence[Plot], out: Path) -> list[Path]:
    """Write each drawn plot as `<name>.png` and `<name>.svg` in `out`; return the files."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for plot in plots:
        png, svg = out / f"{plot.name}.png", out / f"{plot.name}.svg"
        if plot.figure is None:
            for stale in (png, svg):
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
            continue
        plot.figure.savefig(png, dpi=DPI, format="png", metadata=PNG_METADATA)
        plot.figure.set_layout_engine("none")  # laid out by the first save; not again
        plot.figure.savefig(svg, dpi=DPI, format="svg", metadata=SVG_METADATA)
        written += [png, svg]
    return written


# ---------------------------------------------------------------- formatting


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 90:
        return f"{s} s"
    if s < 5400:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def pct(value: Any, ci: Any = None) -> str:
    v = number(value)
    if v is None:
        return "-"
    c = number(ci)
    return f"{100 * v:.2f}%" + (f" ± {100 * c:.2f}" if c is not None else "")


def value_text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def device_text(data: RunData) -> str:
    rt = data.runtime()
    device = rt.get("device") or data.view.device
    if not device:
        return "-"
    parts = [str(device)]
    for key in ("impl", "precision"):
        if rt.get(key):
            parts.append(f"{key} {rt[key]}")
    if rt.get("world_size") and rt["world_size"] != 1:
        parts.append(f"{rt['world_size']} processes")
    if rt.get("torch"):
        parts.append(f"torch {rt['torch']}")
    return ", ".join(parts)


def best_validation(data: RunData) -> tuple[int, dict[str, Any]] | None:
    """The best validated epoch: the first of the reader's top-k ordering."""
    val = data.validation()
    top = [e for e in data.view.top_epochs if e in val]
    return (top[0], val[top[0]]) if top else None


def progress_text(data: RunData) -> str:
    total = data.epochs * data.iters_per_epoch
    it = data.view.iteration
    done = len(data.validation())
    return f"iteration {it} of {total}, {done} of {data.epochs} epochs validated"


def run_facts(data: RunData) -> list[tuple[str, Any]]:
    """The header rows of a run: what a person asks first about it."""
    best = best_validation(data)
    ens = data.ensemble()
    speed = data.iters_per_sec()
    rows: list[tuple[str, Any]] = [
        ("preset", data.preset),
        ("state", html.state_html(data.state)),
        ("progress", progress_text(data)),
        ("device", device_text(data)),
        ("wall time", duration(data.wall_time())),
        ("iterations / s", f"{speed:.2f}" if speed else "-"),
        ("best validation", f"{pct(best[1]['accuracy'], best[1].get('ci95'))} at epoch "
                            f"{best[0]}" if best else "-"),
        ("ensemble test", f"{pct(ens['accuracy'], ens.get('ci95'))} (epochs "
                          f"{', '.join(str(m) for m in ens['members'])}, "
                          f"{ens.get('tasks', '?')} tasks)" if ens else "-"),
    ]
    if data.view.error:
        rows.insert(2, ("error", data.view.error))
    return rows


# ---------------------------------------------------------------- one run


def write_run_report(data: RunData, out: Path) -> Path:
    """A one-run report in `out`; returns `out/index.html`."""
    from mamlpp_tui.report.figures import run_plots

    out = Path(out)
    plots = run_plots(data)
    save_plots(plots, out)
    label, diff = data.config_diff()
    if diff:
        diff_html = html.table(("key", label.split(" ")[0] if label.startswith("preset")
                                else "default", "this run"),
                               [(k, value_text(a), value_text(b)) for k, a, b in diff])
    else:
        diff_html = f"<p>Same as {html.esc(label)}.</p>"
    header = '<div class="cards">' + html.card(
        "Run", html.key_values(run_facts(data), raw=("state",))) + html.card(
        f"Config differences from {label}", diff_html) + "</div>"
    body = [header, "<h2>Figures</h2>", html.figures(plots, wide=("lslr_evolution",))]
    page = html.page(f"mamlpp report: {data.run_id}", f"Run <code>{html.esc(data.run_id)}</code>",
                     f"{html.esc(data.section('data').get('dataset', '?'))} "
                     f"{data.ways}-way {html.esc(data.section('data').get('shots', '?'))}-shot, "
                     f"{data.epochs} epochs × {data.iters_per_epoch} iterations",
                     body, str(data.run.path))
    index = out / "index.html"
    index.write_text(page)
    return index


# ---------------------------------------------------------------- several runs


def write_compare_report(datas: Sequence[RunData], out: Path) -> Path:
    """A comparison of runs in `out`; returns `out/index.html`."""
    from mamlpp_tui.report.compare import RESULT_HEADERS, config_differences, result_row
    from mamlpp_tui.report.overlay import compare_plots

    out = Path(out)
    plots = compare_plots(datas)
    save_plots(plots, out)
    results = html.table(["#", *RESULT_HEADERS.values()],
                         [[i, *result_row(d).values()] for i, d in enumerate(datas, 1)],
                         numeric=(0, 3, 4, 5, 6, 7, 8))
    diff = config_differences(datas)
    if diff:
        diff_html = html.table(["key", *(f"#{i}" for i in range(1, len(datas) + 1))],
                               [[k, *(value_text(v) for v in vs)] for k, vs in diff])
    else:
        diff_html = "<p>The runs have the same config.</p>"
    body = ['<div class="cards">', html.card("Results", results),
            html.card("Config differences", diff_html), "</div>", "<h2>Figures</h2>",
            html.figures(plots, wide=("losses", "lslr_heatmap"))]
    ids = ", ".join(d.run_id for d in datas)
    page = html.page(f"mamlpp compare: {ids}", f"Comparison of {len(datas)} runs",
                     html.esc(ids), body, ", ".join(str(d.run.path) for d in datas))
    index = out / "index.html"
    index.write_text(page)
    return index
