"""The figures of `mamlpp compare`: the one-run figures with several runs overlaid.

One colour per run, in the order given, the same in every figure; the legend names runs by
their whole id (ids are what a person types next). Curves that cannot share axes (the learned
rates heat maps) become one panel per run on a shared colour scale. A run lacking something
(no validation yet, no ensemble) is left out of that figure and named in its caption; a figure
no run can fill is replaced by a note.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from mamlpp_tui.report.figures import (
    SIZE,
    WIDE,
    Plot,
    _finite_range,
    _heatmap,
    _plot_smoothed,
    _rates_matrix,
    _train_series,
    _validation,
    drawn,
    new_figure,
    percent,
    run_colours,
)
from mamlpp_tui.report.rundata import RunData, number


def _missing(plot: Plot, datas: Sequence[RunData], present: Sequence[RunData], what: str) -> None:
    absent = [d.run_id for d in datas if d not in present]
    if absent:
        plot.caption += f" Without {what}: {', '.join(absent)}."


DASHES = ["-", (0, (6, 3)), (0, (2, 2)), (0, (8, 2, 2, 2)), (0, (1, 3))]


def dash(i: int):
    """Run i's line style in figures where runs often coincide (schedules): an identical
    line then shows both colours in turn instead of hiding the one drawn first."""
    return DASHES[i % len(DASHES)]


def _legend_below(fig, n: int) -> None:
    fig.legend(loc="outside lower center", ncols=1 if n > 2 else n, fontsize=8.5)


@drawn
def compare_losses_plot(datas: Sequence[RunData]) -> Plot:
    plot = Plot("losses", "Training loss",
                "Left: the MSL-weighted total query loss the meta-gradient follows. Right: the "
                "final inner step's query loss. Smoothed, raw values faint.")
    series = [(d, _train_series(d)) for d in datas]
    present = [d for d, (its, _, _) in series if its]
    if not present:
        plot.note = "No run has logged a training iteration yet."
        return plot
    _missing(plot, datas, present, "training iterations")
    fig = new_figure((WIDE[0], WIDE[1] + 0.25 * len(datas)))
    left, right = fig.subplots(1, 2, sharex=True)
    for (d, (its, totals, per_step)), colour in zip(series, run_colours(len(datas))):
        if not its:
            continue
        _plot_smoothed(left, its, totals, colour, d.run_id)
        if per_step:
            _plot_smoothed(right, its, per_step[-1], colour, None)
    left.set_title("weighted total", fontweight="normal")
    right.set_title("final inner step", fontweight="normal")
    for ax in (left, right):
        ax.set_xlabel("iteration")
        ax.set_ylabel("query loss")
    _legend_below(fig, len(present))
    plot.figure = fig
    return plot


@drawn
def compare_validation_plot(datas: Sequence[RunData]) -> Plot:
    plot = Plot("validation", "Validation accuracy per epoch",
                "Each run's mean validation accuracy with its 95% confidence interval (band); "
                "stars: each run's top-k epochs.")
    present = [d for d in datas if d.validation()]
    if not present:
        plot.note = "No run has been validated yet (each validates after its first epoch)."
        return plot
    _missing(plot, datas, present, "validation")
    fig = new_figure((SIZE[0], SIZE[1] + 0.25 * len(datas)))
    ax = fig.add_subplot()
    for d, colour in zip(datas, run_colours(len(datas))):
        if d not in present:
            continue
        epochs, acc, ci = _validation(d)
        mean = percent(acc)
        ax.fill_between(epochs, [m - 100 * c for m, c in zip(mean, ci)],
                        [m + 100 * c for m, c in zip(mean, ci)], color=colour, alpha=0.1, lw=0)
        ax.plot(epochs, mean, "o-", color=colour, lw=1.6, ms=3, label=d.run_id)
        top = [e for e in d.view.top_epochs if e in epochs]
        ax.plot(top, [mean[epochs.index(e)] for e in top], "*", color=colour, ms=11,
                mec="black", mew=0.4)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    _legend_below(fig, len(present))
    plot.figure = fig
    return plot


@drawn
def compare_ensemble_plot(datas: Sequence[RunData]) -> Plot:
    plot = Plot("ensemble", "Test accuracy: ensemble and members per run",
                "Large marker: the run's ensemble; small: its members' own test accuracy; "
                "bars: 95% confidence intervals.")
    present = [d for d in datas if d.ensemble()]
    if not present:
        plot.note = "No run has an ensemble evaluation yet (`mamlpp ensemble RUN`)."
        return plot
    _missing(plot, datas, present, "an ensemble")
    fig = new_figure((SIZE[0], max(2.4, 0.6 * len(present) + 1.6)))
    ax = fig.add_subplot()
    ys = list(range(len(present)))[::-1]
    colours = dict(zip([d.run_id for d in datas], run_colours(len(datas))))
    for y, d in zip(ys, present):
        ens = d.ensemble()
        colour = colours[d.run_id]
        accs = percent(ens.get("member_accuracies") or [])
        cis = [100 * (number(c) or 0.0) for c in ens.get("member_ci95") or [0.0] * len(accs)]
        offsets = [0.22 * (i + 1) / max(1, len(accs)) for i in range(len(accs))]
        ax.errorbar(accs, [y + o for o in offsets], xerr=cis, fmt="o", color=colour, ms=3.5,
                    alpha=0.55, capsize=2, lw=1)
        acc, ci = 100 * ens["accuracy"], 100 * (number(ens.get("ci95")) or 0.0)
        ax.errorbar(acc, y, xerr=ci, fmt="D", color=colour, ms=7, capsize=4, lw=1.8)
        ax.annotate(f"{acc:.2f}% ± {ci:.2f}", (acc, y), textcoords="offset points",
                    xytext=(0, -13), ha="center", fontsize=7.5)
    ax.set_yticks(ys, [d.run_id for d in present], fontsize=8.5)
    ax.set_ylim(-0.7, len(present) - 0.2)
    ax.set_xlabel("test accuracy (%)")
    ax.grid(axis="y", visible=False)
    plot.figure = fig
    return plot


@drawn
def compare_msl_plot(datas: Sequence[RunData]) -> Plot:
    plot = Plot("msl_weights", "Final-step MSL weight by epoch",
                "Weight of the final inner step's query loss per epoch (the engine's schedule "
                "for each run's config); the other steps share what remains. Runs with the "
                "same schedule show as one dashed line of alternating colours.")
    present = [d for d in datas if d.planned_msl()]
    if not present:
        plot.note = "No run's config validates, so there is no schedule to draw."
        return plot
    fig = new_figure((SIZE[0], SIZE[1] + 0.25 * len(datas)))
    ax = fig.add_subplot()
    for i, (d, colour) in enumerate(zip(datas, run_colours(len(datas)))):
        planned = d.planned_msl()
        if planned:
            ax.plot(range(len(planned)), [w[-1] for w in planned], color=colour, lw=1.8,
                    drawstyle="steps-mid", label=d.run_id, ls=dash(i))
    ax.set_xlabel("epoch")
    ax.set_ylabel("final-step weight")
    ax.set_ylim(-0.03, 1.05)
    ax.xaxis.get_major_locator().set_params(integer=True)
    _legend_below(fig, len(present))
    plot.figure = fig
    return plot


@drawn
def compare_meta_lr_plot(datas: Sequence[RunData]) -> Plot:
    from mamlpp_tui.report.figures import lr_scale, scaled_label

    plot = Plot("meta_lr", "Meta learning rate", "Adam's learning rate per iteration, as logged.")
    lines = []
    for d in datas:
        pts = [(e["iteration"], float(e["meta_lr"])) for e in d.train()
               if number(e.get("meta_lr")) is not None]
        lines.append((d, pts))
    if not any(pts for _, pts in lines):
        plot.note = "No run has logged a training iteration yet."
        return plot
    scale = lr_scale([v for _, pts in lines for _, v in pts])
    fig = new_figure((SIZE[0], SIZE[1] + 0.25 * len(datas)))
    ax = fig.add_subplot()
    for i, ((d, pts), colour) in enumerate(zip(lines, run_colours(len(datas)))):
        if pts:
            ax.plot([p[0] for p in pts], [p[1] / scale for p in pts], color=colour, lw=1.6,
                    label=d.run_id, ls=dash(i))
    ax.set_xlabel("iteration")
    ax.set_ylabel(scaled_label("meta learning rate", scale))
    _legend_below(fig, sum(1 for _, pts in lines if pts))
    plot.figure = fig
    return plot


@drawn
def compare_lslr_plot(datas: Sequence[RunData]) -> Plot:
    plot = Plot("lslr_heatmap", "Learned inner learning rates (layer × step), last logged",
                "One heat map per run on a shared colour scale.")
    present = [(d, d.lslr_history()[-1][1]) for d in datas if d.lslr_history()]
    if not present:
        plot.note = "No run has logged learned rates yet."
        return plot
    matrices = [_rates_matrix(rates) for _, rates in present]
    lo, hi = _finite_range([m for _, m in matrices])
    cols = min(3, len(present))
    rows = math.ceil(len(present) / cols)
    fig = new_figure((WIDE[0], 4.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    image = None
    for i, ((d, _), (names, matrix)) in enumerate(zip(present, matrices)):
        image = _heatmap(axes[i], names, matrix, lo, hi, annotate=len(matrix[0]) <= 5)
        axes[i].set_title(d.run_id, fontsize=9, fontweight="normal")
        if i % cols:
            axes[i].set_yticks([])
    for ax in axes[len(present):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=list(axes[:len(present)]), shrink=0.9, label="inner learning rate")
    plot.figure = fig
    return plot


def compare_plots(datas: Sequence[RunData]) -> list[Plot]:
    """Every figure of a comparison, in page order."""
    return [compare_losses_plot(datas), compare_validation_plot(datas),
            compare_ensemble_plot(datas), compare_msl_plot(datas), compare_meta_lr_plot(datas),
            compare_lslr_plot(datas)]
