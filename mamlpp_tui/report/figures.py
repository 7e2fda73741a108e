"""The report's figures, drawn with matplotlib's object API on the Agg canvas.

Why this way:

- `matplotlib.figure.Figure` without pyplot: no global figure registry, no GUI backend, no
  state shared between figures, so a report is the same whatever else the process drew.
- Every figure is a `Plot`: a name (the file stem), a title and caption for the page, and the
  figure, or no figure and a note saying why it is missing (no validation yet, no ensemble yet).
  The page shows the note where the figure would be, so a report of a young or crashed run
  says what it lacks instead of drawing empty axes.
- Sizes are fixed (`SIZE`, `WIDE`, `DPI`), never "tight" bounding boxes, so the PNG's pixel
  size is known in advance and the page lays out before the images load.
- Curves: smoothed line on top of the raw one drawn faint (an exponential moving average with
  bias correction, as TensorBoard smooths, its span a fixed fraction of the series).
- Policy comes from the engine (`RunData.planned_msl`, `first_order_epochs`,
  `planned_meta_lr`) and the dashboard reader (top-k epochs), drawn next to what the events say
  happened.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from matplotlib import colormaps, rcParams
from matplotlib.figure import Figure

from mamlpp_tui.report.rundata import RunData, number

DPI = 110
SIZE = (7.2, 3.9)  # inches: 792 x 429 pixels
WIDE = (10.8, 3.9)  # 1188 x 429
TALL = (7.2, 4.6)  # heat maps with a row per adapted tensor
FIRST_ORDER_COLOUR = "#e8e8e8"
TOTAL_COLOUR = "#111111"
STYLE = {
    "font.size": 9.5,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#dddddd",
    "grid.linewidth": 0.6,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "svg.hashsalt": "mamlpp",  # reproducible SVG ids
}


@dataclass
class Plot:
    """One figure of a report, or the reason it is not there."""

    name: str
    title: str
    caption: str = ""
    figure: Figure | None = None
    note: str | None = None

    @property
    def pixels(self) -> tuple[int, int] | None:
        if self.figure is None:
            return None
        w, h = self.figure.get_size_inches()
        return int(w * DPI), int(h * DPI)


def new_figure(size: tuple[float, float] = SIZE) -> Figure:
    """A figure whose PNG is exactly round(inches x DPI) pixels (the canvas truncates, so the
    size is nudged a quarter pixel up: 4.65 in at 110 dpi is 512 pixels, not 511)."""
    inches = tuple((round(v * DPI) + 0.25) / DPI for v in size)
    with _style():
        return Figure(figsize=inches, dpi=DPI, layout="constrained")


class _style:
    """rcParams for the duration of a figure's creation (the object API reads them then)."""

    def __enter__(self) -> None:
        self._saved = {k: rcParams[k] for k in STYLE}
        rcParams.update(STYLE)

    def __exit__(self, *exc: object) -> None:
        rcParams.update(self._saved)


def drawn(fn: Callable[..., Plot]) -> Callable[..., Plot]:
    """Draw under the report style (axes and artists also read rcParams when made)."""

    def wrapper(*args: Any, **kwargs: Any) -> Plot:
        with _style():
            return fn(*args, **kwargs)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


# ---------------------------------------------------------------- helpers


def smooth(values: Sequence[float]) -> list[float]:
    """Bias-corrected exponential moving average, span about 1/25 of the series."""
    n = len(values)
    if n < 3:
        return list(values)
    span = max(1.0, n / 25)
    weight = 1 - 1 / span if span > 1 else 0.0
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        avg = weight * avg + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(avg / norm)
    return out


def step_colours(n: int) -> list[Any]:
    cmap = colormaps["viridis"]
    return [cmap(0.85 * i / max(1, n - 1)) for i in range(n)]


def run_colours(n: int) -> list[Any]:
    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _ranges(epochs: Sequence[int]) -> list[tuple[int, int]]:
    """Contiguous [first, last] ranges of a sorted list of epochs."""
    out: list[tuple[int, int]] = []
    for e in epochs:
        if out and e == out[-1][1] + 1:
            out[-1] = (out[-1][0], e)
        else:
            out.append((e, e))
    return out


def shade_first_order(ax, data: RunData, to_x: Callable[[float], float],
                      limit: float | None = None, label: bool = True) -> None:
    """Grey band over the epochs trained first order (the engine's derivative-order schedule),
    clipped at `limit` on the x axis; text at its top names it."""
    for first, last in _ranges(data.first_order_epochs()):
        lo, hi = to_x(first), to_x(last + 1)
        if limit is not None:
            hi = min(hi, limit)
        if hi <= lo:
            continue
        ax.axvspan(lo, hi, color=FIRST_ORDER_COLOUR, zorder=0, lw=0)
        if label:
            ax.text((lo + hi) / 2, 0.98, "first order", transform=ax.get_xaxis_transform(),
                    ha="center", va="top", fontsize=7.5, color="#777777")


def epoch_axis(ax, ipe: int) -> None:
    """Epochs along the top of an iteration axis."""
    if ipe > 0:
        top = ax.secondary_xaxis("top", functions=(lambda x: x / ipe, lambda e: e * ipe))
        top.set_xlabel("epoch", fontsize=8, color="#555555")
        top.tick_params(labelsize=7.5, colors="#555555")


def percent(values: Sequence[float | None]) -> list[float]:
    return [math.nan if v is None else 100 * v for v in values]


def _train_series(data: RunData) -> tuple[list[int], list[float | None], list[list[float | None]]]:
    """(iterations, total loss, [per-step losses]) from the dashboard's loss points."""
    its, totals, steps = [], [], []
    for it, (loss, step_losses, _acc) in data.view.loss_points:
        its.append(it)
        totals.append(loss)
        steps.append(list(step_losses))
    n = max([len(s) for s in steps] + [data.inner_steps])
    per_step = [[s[i] if i < len(s) else None for s in steps] for i in range(n)]
    return its, totals, per_step


def _plot_smoothed(ax, xs: Sequence[float], ys: Sequence[float | None], colour: Any,
                   label: str | None, width: float = 1.6, style: str = "-",
                   raw_alpha: float = 0.22) -> bool:
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    if not pts:
        return False
    x, y = zip(*pts)
    if len(pts) > 2:
        ax.plot(x, y, color=colour, alpha=raw_alpha, lw=0.7, ls=style)
    ax.plot(x, smooth(y), color=colour, lw=width, label=label, ls=style)
    return True


def _validation(data: RunData) -> tuple[list[int], list[float], list[float]]:
    val = data.validation()
    epochs = sorted(val)
    return (epochs, [float(val[e]["accuracy"]) for e in epochs],
            [number(val[e].get("ci95")) or 0.0 for e in epochs])


# ---------------------------------------------------------------- one run


@drawn
def losses_plot(data: RunData) -> Plot:
    plot = Plot("losses", "Query loss per inner step",
                "Query (target) loss after each inner step and the MSL-weighted total the "
                "meta-gradient follows, over training iterations: smoothed, raw values faint. "
                "Once MSL is off the total is the final step's loss, drawn once. "
                "Grey: first-order meta-gradients.")
    its, totals, per_step = _train_series(data)
    if not its:
        plot.note = "No training iterations logged yet."
        return plot
    fig = new_figure()
    ax = fig.add_subplot()
    ipe = data.iters_per_epoch
    shade_first_order(ax, data, lambda e: e * ipe, limit=max(its))
    if per_step:  # where only the final step counts (MSL off) it is the total: drawn once
        per_step[-1] = [None if v is not None and t is not None and abs(v - t) <= 1e-6 * abs(t)
                        else v for v, t in zip(per_step[-1], totals)]
    for i, (series, colour) in enumerate(zip(per_step, step_colours(len(per_step)))):
        _plot_smoothed(ax, its, series, colour, f"step {i + 1}", width=1.3, raw_alpha=0.13)
    _plot_smoothed(ax, its, totals, TOTAL_COLOUR, "weighted total", width=2.0, raw_alpha=0.25)
    mpp = data.section("maml_pp")
    msl_off = int(mpp.get("msl_epochs") or 0) * ipe
    if mpp.get("msl") and 0 < msl_off <= max(its):
        ax.axvline(msl_off, color="#aa3333", lw=0.9, ls=":")
        ax.text(msl_off, 0.98, " MSL off", transform=ax.get_xaxis_transform(), ha="left",
                va="top", fontsize=7.5, color="#aa3333")
    ax.set_xlabel("iteration")
    ax.set_ylabel("query loss")
    ax.set_xlim(min(its), max(its))
    epoch_axis(ax, ipe)
    ax.legend(loc="upper right", ncols=2)
    plot.figure = fig
    return plot


@drawn
def msl_plot(data: RunData) -> Plot:
    plot = Plot("msl_weights", "Multi-step loss weights by epoch",
                "Weight of each inner step's query loss in the task loss, per epoch: the "
                "engine's schedule for this config (lines) and the weights the run logged "
                "(dots). Steps with the same weights share a line. Grey: first order.")
    planned = data.planned_msl()
    observed = data.view.msl_by_epoch
    if not planned and not observed:
        plot.note = "No MSL weights: the config does not validate and no iteration was logged."
        return plot
    n = max([len(w) for w in planned] + [len(w) for w in observed.values()] + [1])
    fig = new_figure()
    ax = fig.add_subplot()
    shade_first_order(ax, data, lambda e: e - 0.5)
    groups: dict[tuple, list[int]] = {}
    for i in range(n):
        key = tuple(w[i] if i < len(w) else None for w in planned) or (i,)
        groups.setdefault(key, []).append(i)
    colours = step_colours(n)
    for steps in groups.values():
        label = f"step {steps[0] + 1}" if len(steps) == 1 else \
            f"steps {steps[0] + 1}–{steps[-1] + 1}"
        colour = colours[steps[-1]]
        if planned:
            ax.plot(range(len(planned)), [w[steps[0]] for w in planned], color=colour,
                    lw=1.8, drawstyle="steps-mid", label=label)
        xs = sorted(e for e, w in observed.items() if steps[0] < len(w))
        ax.plot(xs, [observed[e][steps[0]] for e in xs], "o", color=colour, ms=4.5,
                mec="white", mew=0.6, label=None if planned else label)
    if not data.section("maml_pp").get("msl", True):
        ax.text(0.5, 0.5, "MSL switched off: only the final step counts", ha="center",
                transform=ax.transAxes, color="#555555")
    ax.set_xlabel("epoch")
    ax.set_ylabel("weight")
    ax.set_ylim(-0.03, 1.05)
    ax.set_xlim(-0.5, max(len(planned), max(observed, default=0) + 1) - 0.5)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="center right")
    plot.figure = fig
    return plot


def _rates_matrix(rates: dict[str, list[float | None]]) -> tuple[list[str], list[list[float]]]:
    names = list(rates)
    steps = max((len(v) for v in rates.values()), default=0)
    return names, [[math.nan if (i >= len(rates[k]) or rates[k][i] is None) else rates[k][i]
                    for i in range(steps)] for k in names]


def _heatmap(ax, names: list[str], matrix: list[list[float]], vmin: float, vmax: float,
             annotate: bool = True):
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax,
                      interpolation="nearest")
    steps = len(matrix[0]) if matrix else 0
    ax.set_xticks(range(steps), [f"step {i + 1}" for i in range(steps)])
    ax.set_yticks(range(len(names)), names)
    ax.tick_params(length=0)
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if annotate:
        mid = (vmin + vmax) / 2
        for r, row in enumerate(matrix):
            for c, v in enumerate(row):
                if math.isfinite(v):
                    ax.text(c, r, f"{v:.4f}", ha="center", va="center", fontsize=8.5,
                            color="black" if v > mid else "white")
    return image


def _finite_range(matrices: list[list[list[float]]]) -> tuple[float, float]:
    values = [v for m in matrices for row in m for v in row if math.isfinite(v)]
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    return (lo, hi) if hi > lo else (lo - 1e-3, hi + 1e-3)


def _lslr_when(x: float, data: RunData) -> str:
    return "at the start" if x == 0 else f"after epoch {math.ceil(x) - 1}" \
        if float(x).is_integer() else f"at epoch {x:.2f}"


@drawn
def lslr_heatmap_plot(data: RunData) -> Plot:
    plot = Plot("lslr_heatmap", "Learned inner learning rates (layer × step)",
                "The per-layer, per-step inner learning rates (LSLR) as the run last logged "
                "them. Conv biases feed batch norm, so their rates get no gradient and stay "
                "at their initial value.")
    history = data.lslr_history()
    if not history:
        plot.note = "No learned rates logged yet."
        return plot
    x, rates = history[-1]
    names, matrix = _rates_matrix(rates)
    plot.title += f", {_lslr_when(x, data)}"
    fig = new_figure(TALL)
    ax = fig.add_subplot()
    lo, hi = _finite_range([matrix])
    image = _heatmap(ax, names, matrix, lo, hi)
    fig.colorbar(image, ax=ax, shrink=0.9, label="inner learning rate")
    plot.figure = fig
    return plot


def _unchanged(name: str, history: list[tuple[float, dict[str, list[float | None]]]]) -> bool:
    """Whether a tensor's rates stayed within 1% of their first values at every step."""
    first = history[0][1].get(name) or []
    for _, rates in history[1:]:
        for a, b in zip(first, rates.get(name) or []):
            if a is None or b is None or abs(b - a) > 0.01 * max(abs(a), 1e-12):
                return False
    return True


@drawn
def lslr_evolution_plot(data: RunData) -> Plot:
    plot = Plot("lslr_evolution", "Learned inner learning rates over training",
                "Each adapted tensor's learned rate per inner step, at the start and after "
                "every epoch (one panel per step, shared scale; biases dashed).")
    history = data.lslr_history()
    if len(history) < 2:
        plot.note = "No learned rates logged yet." if not history else \
            "The learned rates have been logged once so far (at the start); their " \
            "evolution shows after the first epoch."
        return plot
    every = list(history[-1][1])
    steps = max(len(v) for v in history[-1][1].values())
    still = [n for n in every if _unchanged(n, history)]
    names = [n for n in every if n not in still] or every
    if still and names is not every:
        plot.caption += (f" Left out, as their rates stayed within 1% of where they started: "
                         f"{', '.join(still)} (their values are in the heat map).")
    fig = new_figure(WIDE)
    axes = fig.subplots(1, steps, sharey=True, squeeze=False)[0]
    colours = {n: c for n, c in zip([n for n in every if not n.endswith("bias")],
                                    run_colours(len(every)))}
    for n in every:
        if n.endswith("bias"):
            colours[n] = colours.get(n.removesuffix("bias") + "weight", "#888888")
    xs = [x for x, _ in history]
    for i, ax in enumerate(axes):
        for n in names:
            ys = [r.get(n, [])[i] if i < len(r.get(n, [])) else None for _, r in history]
            ax.plot(xs, [math.nan if y is None else y for y in ys], color=colours[n],
                    lw=1.0 if n.endswith("bias") else 1.5,
                    ls="--" if n.endswith("bias") else "-",
                    label=n if i == 0 else None)
        ax.set_title(f"step {i + 1}", fontweight="normal")
        ax.set_xlabel("epochs done")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].set_ylabel("inner learning rate")
    fig.legend(loc="outside right center", ncols=1)
    plot.figure = fig
    return plot


@drawn
def meta_lr_plot(data: RunData) -> Plot:
    cosine = bool(data.section("maml_pp").get("cosine", True))
    plot = Plot("meta_lr", "Meta learning rate" + (" (cosine annealing)" if cosine else ""),
                "Adam's learning rate per iteration as logged, and the engine's closed-form "
                "schedule per epoch.")
    planned = data.planned_meta_lr()
    train = data.train()
    xs = [e["iteration"] for e in train if number(e.get("meta_lr")) is not None]
    ys = [float(e["meta_lr"]) for e in train if number(e.get("meta_lr")) is not None]
    if not planned and not xs:
        plot.note = "No meta learning rate logged yet."
        return plot
    ipe = data.iters_per_epoch
    scale = lr_scale(planned + ys)
    fig = new_figure()
    ax = fig.add_subplot()
    if planned:
        edges = [e * ipe for e in range(len(planned) + 1)]
        ax.stairs([v / scale for v in planned], edges, baseline=None, color="#ff7f0e", lw=5,
                  alpha=0.35, label="engine schedule")
    if xs:
        ax.plot(xs, [y / scale for y in ys], color="#1f77b4", lw=1.5, label="logged")
    ax.set_xlabel("iteration")
    ax.set_ylabel(scaled_label("meta learning rate", scale))
    epoch_axis(ax, ipe)
    ax.legend(loc="upper right")
    plot.figure = fig
    return plot


def scaled_label(label: str, scale: float) -> str:
    return label if scale == 1 else rf"{label} ($\times 10^{{{round(math.log10(scale))}}}$)"


def lr_scale(values: Sequence[float]) -> float:
    """A power of ten that brings the largest value into [1, 10) (plain tick labels)."""
    top = max((abs(v) for v in values if math.isfinite(v)), default=0.0)
    return 10.0 ** math.floor(math.log10(top)) if top > 0 else 1.0


@drawn
def validation_plot(data: RunData) -> Plot:
    plot = Plot("validation", "Validation accuracy per epoch",
                f"Mean accuracy over the fixed validation tasks with its 95% confidence "
                f"interval (band); stars: the top {data.top_k} epochs, the ensemble's members. "
                "Grey: first order.")
    epochs, acc, ci = _validation(data)
    if not epochs:
        plot.note = "No validation yet: the run has not finished its first epoch."
        return plot
    fig = new_figure()
    ax = fig.add_subplot()
    shade_first_order(ax, data, lambda e: e - 0.5, limit=max(epochs) + 0.5)
    mean, half = percent(acc), [100 * c for c in ci]
    ax.fill_between(epochs, [m - h for m, h in zip(mean, half)],
                    [m + h for m, h in zip(mean, half)], color="#1f77b4", alpha=0.18, lw=0,
                    label="95% CI")
    ax.plot(epochs, mean, "o-", color="#1f77b4", lw=1.6, ms=3.5, label="validation")
    top = [e for e in data.view.top_epochs if e in epochs]
    if top:
        ax.plot(top, [mean[epochs.index(e)] for e in top], "*", color="#e6a100", ms=13,
                mec="#7a5500", mew=0.6, label=f"top {data.top_k}")
        for rank, e in enumerate(top, 1):
            ax.annotate(f"#{rank}", (e, mean[epochs.index(e)]), textcoords="offset points",
                        xytext=(0, -17), ha="center", fontsize=8, color="#7a5500")
    ens = data.ensemble()
    if ens:
        ax.axhline(100 * ens["accuracy"], color="#2ca02c", lw=1.2, ls="--",
                   label=f"ensemble test {100 * ens['accuracy']:.1f}%")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="lower right", ncols=2)
    plot.figure = fig
    return plot


@drawn
def ensemble_plot(data: RunData) -> Plot:
    plot = Plot("ensemble", "Test accuracy: ensemble members and their ensemble",
                "Each member's own test accuracy and the ensemble's (query logits averaged, "
                "then argmax) with 95% confidence intervals, on the same fixed test tasks.")
    ens = data.ensemble()
    if not ens:
        plot.note = "No ensemble evaluation yet: it runs when training finishes, or now " \
                    f"with `mamlpp ensemble {data.run_id}`."
        return plot
    members = list(ens["members"])
    accs = list(ens.get("member_accuracies") or [])
    cis = list(ens.get("member_ci95") or [0.0] * len(members))
    vals = list(ens.get("member_val_accuracies") or [None] * len(members))
    labels = [f"epoch {m}" + (f"  (val {100 * v:.1f}%)" if number(v) is not None else "")
              for m, v in zip(members, vals)] + ["ensemble"]
    xs = percent(accs + [ens["accuracy"]])
    errs = [100 * (number(c) or 0.0) for c in cis + [ens.get("ci95")]]
    fig = new_figure((SIZE[0], max(2.4, 0.55 * len(labels) + 1.2)))
    ax = fig.add_subplot()
    ys = list(range(len(labels)))[::-1]
    colours = ["#1f77b4"] * len(members) + ["#2ca02c"]
    for y, x, err, colour in zip(ys, xs, errs, colours):
        ax.errorbar(x, y, xerr=err, fmt="o", color=colour, ms=7 if colour == "#2ca02c" else 5,
                    capsize=4, lw=1.5)
        ax.annotate(f"{x:.2f}% ± {err:.2f}", (x, y), textcoords="offset points", xytext=(0, 8),
                    ha="center", fontsize=7.5)
    ax.set_yticks(ys, labels)
    for tick in ax.get_yticklabels():
        if tick.get_text() == "ensemble":
            tick.set_fontweight("bold")
    ax.set_ylim(-0.7, len(labels) - 0.3)
    ax.set_xlabel(f"test accuracy (%) on {ens.get('tasks', '?')} tasks")
    ax.grid(axis="y", visible=False)
    plot.figure = fig
    return plot


def run_plots(data: RunData) -> list[Plot]:
    """Every figure of a one-run report, in page order."""
    return [losses_plot(data), validation_plot(data), ensemble_plot(data), msl_plot(data),
            meta_lr_plot(data), lslr_heatmap_plot(data), lslr_evolution_plot(data)]
