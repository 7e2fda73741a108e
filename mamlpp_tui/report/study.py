"""`mamlpp report STUDY`: a study's result table, its variants compared, its members' curves.

The numbers are the studies code's own (`engine.study_results.study_table`, what `mamlpp study
show --json` prints): the mean and standard deviation over finished seeds, each member's
ensemble accuracy and CI. Nothing here aggregates again; the figures draw that table, and each
member's validation curve comes from its run directory through `rundata.load_run`, as a run
report's does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mamlpp_tui.report import html
from mamlpp_tui.report.build import duration, pct, save_plots
from mamlpp_tui.report.figures import SIZE, WIDE, Plot, drawn, new_figure, run_colours
from mamlpp_tui.report.rundata import RunData, load_run, number


def overrides_text(overrides: Any) -> str:
    """A variant's overrides as `key=value` pairs (`defaults` when it has none)."""
    if isinstance(overrides, dict):
        pairs = [f"{k}={v}" for k, v in overrides.items()]
    elif isinstance(overrides, (list, tuple)):
        pairs = [str(o) for o in overrides]
    else:
        pairs = [str(overrides)] if overrides else []
    return ", ".join(pairs) or "as the base"


def mean_std_text(mean: Any, std: Any) -> str:
    m, s = number(mean), number(std)
    if m is None:
        return "-"
    return f"{100 * m:.2f}%" + (f" ± {100 * s:.2f}" if s is not None else "")


@drawn
def variants_plot(table: dict[str, Any]) -> Plot:
    plot = Plot("variants", "Test accuracy per variant",
                "Bars: the mean ensemble test accuracy over finished seeds; error bars: the "
                "standard deviation over seeds (none with one seed); dots: each seed.")
    rows = table.get("rows") or []
    if not any(number(r.get("test_accuracy_mean")) is not None for r in rows):
        plot.note = "No member has finished yet, so no variant has a test accuracy."
        return plot
    fig = new_figure((SIZE[0], max(2.6, 0.5 * len(rows) + 1.4)))
    ax = fig.add_subplot()
    ys = list(range(len(rows)))[::-1]
    colours = run_colours(len(rows))
    for y, row, colour in zip(ys, rows, colours):
        mean, std = number(row.get("test_accuracy_mean")), number(row.get("test_accuracy_std"))
        if mean is None:
            ax.text(0.01, y, "no finished seed", transform=ax.get_yaxis_transform(),
                    va="center", color="#777777")
            continue
        ax.barh(y, 100 * mean, color=colour, alpha=0.75, height=0.6)
        if std is not None:
            ax.errorbar(100 * mean, y, xerr=100 * std, fmt="none", ecolor="black", capsize=4,
                        lw=1.2)
        seeds = [100 * m["test_accuracy"] for m in row.get("members") or []
                 if m.get("state") == "finished" and number(m.get("test_accuracy")) is not None]
        ax.plot(seeds, [y] * len(seeds), "o", color="white", mec="black", ms=4.5, mew=0.8)
        label = f"{100 * mean:.2f}%" + (f" ± {100 * std:.2f}" if std is not None else "")
        ax.annotate(label, (100 * mean + 100 * (std or 0), y), textcoords="offset points",
                    xytext=(6, 0), va="center", fontsize=8)
    ax.set_yticks(ys, [r["variant"] for r in rows])
    ax.set_xlim(0, 112)  # bars start at zero; the labels carry the digits
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel("ensemble test accuracy (%)")
    ax.grid(axis="y", visible=False)
    plot.figure = fig
    return plot


@drawn
def members_validation_plot(rows: Sequence[dict[str, Any]],
                            runs: dict[str, RunData]) -> Plot:
    plot = Plot("validation", "Validation accuracy of every member, per variant",
                "One panel per variant (shared axes), one line per seed with its 95% CI band.")
    panels = []
    for row in rows:
        members = [(m["seed"], runs[m["run"]]) for m in row.get("members") or []
                   if m.get("run") in runs and runs[m["run"]].validation()]
        panels.append((row["variant"], members))
    if not any(members for _, members in panels):
        plot.note = "No member has been validated yet."
        return plot
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig = new_figure((WIDE[0], 2.9 * nrows + 0.6))
    axes = fig.subplots(nrows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    seeds = sorted({seed for _, members in panels for seed, _ in members})
    colours = dict(zip(seeds, run_colours(len(seeds))))
    for ax, (variant, members) in zip(axes, panels):
        for seed, data in members:
            val = data.validation()
            epochs = sorted(val)
            mean = [100 * val[e]["accuracy"] for e in epochs]
            half = [100 * (number(val[e].get("ci95")) or 0.0) for e in epochs]
            ax.fill_between(epochs, [m - h for m, h in zip(mean, half)],
                            [m + h for m, h in zip(mean, half)], color=colours[seed],
                            alpha=0.12, lw=0)
            ax.plot(epochs, mean, "o-", color=colours[seed], ms=2.5, lw=1.4)
        ax.set_title(variant, fontsize=9, fontweight="normal")
        if not members:
            ax.text(0.5, 0.5, "not validated yet", transform=ax.transAxes, ha="center",
                    color="#777777")
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax in axes[::cols]:
        ax.set_ylabel("accuracy (%)")
    for ax in axes[(nrows - 1) * cols:]:
        ax.set_xlabel("epoch")
    handles = [axes[0].plot([], [], "o-", color=colours[s], ms=3, label=f"seed {s}")[0]
               for s in seeds]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(seeds), 6))
    plot.figure = fig
    return plot


def _results_html(table: dict[str, Any]) -> str:
    rows = []
    for r in table.get("rows") or []:
        rows.append([r["variant"], overrides_text(r.get("overrides")),
                     f"{r.get('finished', 0)}/{r.get('seeds', len(r.get('members') or []))}",
                     mean_std_text(r.get("test_accuracy_mean"), r.get("test_accuracy_std")),
                     mean_std_text(r.get("best_epoch_test_accuracy_mean"),
                                   r.get("best_epoch_test_accuracy_std")),
                     mean_std_text(r.get("best_val_accuracy_mean"),
                                   r.get("best_val_accuracy_std")),
                     duration(number(r.get("wall_s_mean")))])
    return html.table(["variant", "overrides", "finished", "ensemble test (mean ± std)",
                       "best epoch test", "best validation", "wall time (mean)"], rows,
                      numeric=(2, 3, 4, 5, 6))


def _members_html(table: dict[str, Any]) -> str:
    rows = []
    for r in table.get("rows") or []:
        for m in r.get("members") or []:
            rows.append([r["variant"], m.get("seed"), m.get("run") or "-", m.get("state"),
                         pct(m.get("test_accuracy"), m.get("ci95")),
                         pct(m.get("best_val_accuracy")), duration(number(m.get("wall_s")))])
    return html.table(["variant", "seed", "run", "state", "ensemble test ± 95% CI",
                       "best validation", "wall time"], rows, numeric=(1, 4, 5, 6))


def write_study_report(study, out: Path) -> Path:
    """A study's report in `out`; returns `out/index.html`."""
    from engine.studies import member_runs
    from engine.study_results import study_table

    out = Path(out)
    members = member_runs(study, strict=False)
    table = study_table(study, members)
    runs = {mr.run.run_id: load_run(mr.run) for mr in members if mr.run is not None}
    plots = [variants_plot(table), members_validation_plot(table.get("rows") or [], runs)]
    save_plots(plots, out)
    facts = [("kind", table.get("kind")), ("base", table.get("base")),
             ("seeds", ", ".join(str(s) for s in table.get("seeds") or [])),
             ("state", html.state_html(str(table.get("state")))),
             ("finished", f"{table.get('finished')} of {table.get('members_total')}")]
    body = ['<div class="cards">', html.card("Study", html.key_values(facts, raw=("state",))),
            "</div>", "<h2>Results</h2>", _results_html(table),
            "<h2>Figures</h2>", html.figures(plots, wide=("validation",)),
            "<h2>Members</h2>", _members_html(table)]
    page = html.page(f"mamlpp report: study {study.id}", f"Study <code>{html.esc(study.id)}"
                     "</code>", f"{html.esc(table.get('kind'))} of {html.esc(table.get('base'))}"
                     f", {len(table.get('rows') or [])} variants", body, str(study.path))
    index = out / "index.html"
    index.write_text(page)
    return index
