"""The dashboard's panels. Each widget owns one panel and knows how to draw a `RunView`.

Every panel has `show(view)`, called on the UI thread after each poll; it compares the view's
revision counter for its own data and returns at once when nothing it shows has changed, so a
quiet run costs almost nothing to display. Drawing that depends on the panel's size happens in
`render()` (or on resize), so panels reflow when the terminal does.
"""

from __future__ import annotations

import os
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.events import Resize
from textual.widget import Widget
from textual.widgets import DataTable, ProgressBar, RichLog, Static
from textual_plotext import PlotextPlot

from mamlpp_tui.dashboard.format import (
    STATE_STYLES,
    bar,
    clock,
    duration,
    gib,
    heat_style,
    pct,
    rate,
    sparkline,
)
from mamlpp_tui.dashboard.reader import LogLine, RunView

# one colour per inner step, the same names in plotext and Rich so the legend matches the lines
STEP_COLORS = ("cyan", "blue", "magenta", "yellow", "green")
TOTAL_COLOR = "red"


class Panel:
    """Mixin: remembers which revision of its data a panel last drew."""

    revision_key: str = ""

    def changed(self, view: RunView) -> bool:
        """Whether `view` holds new data for this panel (and note it as drawn)."""
        rev = view.revisions.get(self.revision_key, 0)
        if getattr(self, "_drawn_rev", None) == rev:
            return False
        self._drawn_rev = rev
        return True


# ---------------------------------------------------------------- header


class RunHeader(Vertical):
    """Run id, preset, state, device, derivative-order phase, progress, speed and ETA."""

    def __init__(self) -> None:
        super().__init__(id="header", classes="panel")
        self.border_title = "mamlpp"
        self.pending: str | None = None
        self._view: RunView | None = None

    def compose(self) -> ComposeResult:
        yield Static(id="header-title")
        with Horizontal(id="header-progress"):
            yield Static(id="header-counts")
            yield ProgressBar(id="header-bar", show_eta=False)
        yield Static(id="header-error")

    def show(self, view: RunView) -> None:
        """Redraw from `view` (cheap; the header changes on almost every poll)."""
        self._view = view
        self._draw()

    def set_pending(self, text: str | None) -> None:
        """Show a command that was sent but not yet acted on by the engine ("pause sent")."""
        self.pending = text
        self._draw()

    def on_resize(self, event: Resize) -> None:
        """Labels are dropped on narrow terminals so the header keeps to one line."""
        self._draw()

    def _draw(self) -> None:
        view = self._view
        if view is None:
            return
        roomy = self.content_size.width >= 100  # labels and the checkpoint name fit

        def field(label: str, value: str, style: str = "") -> None:
            title.append(f"  {label} " if roomy else "  ", "dim")
            title.append(value, style)

        title = Text()
        title.append(view.run_id, "bold")
        field("preset", view.preset)
        field("state", f"● {view.state}", STATE_STYLES.get(view.state, "bold"))
        if self.pending:
            title.append(f" ({self.pending})", "italic yellow")
        field("device", view.device or "—")
        if view.second_order is None:
            field("phase", "?")
        else:
            field("phase", "second-order" if view.second_order else "first-order",
                  "magenta" if view.second_order else "blue")
        self.query_one("#header-title", Static).update(title)

        counts = Text()
        counts.append(f"iter {view.iteration}/{view.total or '?'}")
        last_epoch = f"0–{view.epochs - 1}" if view.epochs else "?"
        counts.append(f"  epoch {view.epoch} ({last_epoch})")
        counts.append(f"  {view.iters_per_sec:.2f} it/s" if view.iters_per_sec else "  — it/s")
        if view.state == "running":
            counts.append(f"  ETA {duration(view.eta_s)}")
        elif view.state == "finished":
            counts.append("  done")
        if view.latest_checkpoint and roomy:
            counts.append(f"  ckpt {view.latest_checkpoint}", "dim")
        counts.append("  ")
        self.query_one("#header-counts", Static).update(counts)
        progress = self.query_one("#header-bar", ProgressBar)
        progress.update(total=max(1, view.total), progress=min(view.iteration, view.total or 1))

        error = self.query_one("#header-error", Static)
        error.display = bool(view.error)
        if view.error:
            error.update(Text(f"error: {view.error}", "bold red"))


# ---------------------------------------------------------------- losses


def _thin(points: list[tuple[int, float]], limit: int) -> list[tuple[int, float]]:
    """At most `limit` points, evenly picked, always keeping the last one."""
    if len(points) <= limit or limit < 2:
        return points
    step = len(points) / (limit - 1)
    picked = [points[int(i * step)] for i in range(limit - 1)]
    return picked + [points[-1]]


def loss_series(points: tuple[tuple[int, Any], ...],
                steps: int) -> dict[str, list[tuple[int, float]]]:
    """Lines "step 1".."step N" and "total", each [(iteration, loss)], nulls left out.

    Why nulls are skipped rather than drawn as 0: after MSL is switched off the engine no
    longer computes the non-final steps' query losses and reports them as null.
    """
    lines: dict[str, list[tuple[int, float]]] = {f"step {i + 1}": [] for i in range(steps)}
    lines["total"] = []
    for it, (loss, step_losses, _acc) in points:
        for i, value in enumerate(step_losses):
            if value is not None:
                lines.setdefault(f"step {i + 1}", []).append((it, value))
        if loss is not None:
            lines["total"].append((it, loss))
    return lines


def int_ticks(lo: int, hi: int, count: int) -> list[int]:
    """Up to `count` evenly spread whole-number ticks from lo to hi (iterations are integers)."""
    if hi <= lo:
        return [lo]
    n = max(2, count)
    return sorted({round(lo + (hi - lo) * k / (n - 1)) for k in range(n)})


class LossPanel(Vertical, Panel):
    """Query loss of every inner step plus the weighted total, over iterations."""

    revision_key = "losses"

    def __init__(self) -> None:
        super().__init__(id="losses", classes="panel")
        self.border_title = "Query loss per inner step"
        self._points: tuple[tuple[int, Any], ...] = ()
        self._steps = 0

    def compose(self) -> ComposeResult:
        yield PlotextPlot(id="loss-plot")
        yield Static(id="loss-legend")

    def show(self, view: RunView) -> None:
        """Replot when the train events changed (the chart is rebuilt, at most 2000 points)."""
        if not self.changed(view):
            return
        self._points = view.loss_points
        self._steps = max([len(p[1][1]) for p in self._points] + [view.inner_steps])
        self._replot()
        self._legend()

    def on_resize(self, event: Resize) -> None:
        """Replot at the new size: the lines are thinned to what the width can show."""
        self._replot()

    def series(self) -> dict[str, list[tuple[int, float]]]:
        """The chart's lines as drawn (before thinning to the panel's width)."""
        return loss_series(self._points, self._steps)

    def _replot(self) -> None:
        plot = self.query_one("#loss-plot", PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        limit = max(20, 2 * (plot.size.width or 100))  # braille: 2 dots per cell
        lines = self.series()
        if not any(lines.values()):
            plt.title("waiting for the first train event")
        else:
            xs = [p[0] for points in lines.values() for p in points]
            plt.xticks(int_ticks(min(xs), max(xs), max(2, min(6, plot.size.width // 12))))
        for i, (name, points) in enumerate(lines.items()):
            points = _thin(points, limit)
            if not points:
                continue
            color = TOTAL_COLOR if name == "total" else STEP_COLORS[i % len(STEP_COLORS)]
            plt.plot([p[0] for p in points], [p[1] for p in points], marker="braille",
                     color=color)
        plt.xlabel("iteration")
        plot.refresh()

    def _legend(self) -> None:
        text = Text()
        last = self._points[-1] if self._points else None
        if last is None:
            self.query_one("#loss-legend", Static).update(Text("no train events yet", "dim"))
            return
        _it, (loss, steps, acc) = last
        for i in range(self._steps):
            value = steps[i] if i < len(steps) else None
            text.append("━ ", STEP_COLORS[i % len(STEP_COLORS)])
            text.append(f"step {i + 1} ")
            text.append("—  " if value is None else f"{value:.3f}  ", "bold")
        text.append("━ ", TOTAL_COLOR)
        text.append("total ")
        text.append("—" if loss is None else f"{loss:.3f}", "bold")
        text.append(f"  acc {pct(acc, 1)}", "dim")
        self.query_one("#loss-legend", Static).update(text)


# ---------------------------------------------------------------- MSL weights


class MslPanel(Widget, Panel):
    """The multi-step loss weights now (bars) and the final step's weight per epoch."""

    revision_key = "msl"

    def __init__(self) -> None:
        super().__init__(id="msl", classes="panel")
        self.border_title = "MSL weights"
        self._view: RunView | None = None

    def show(self, view: RunView) -> None:
        """Keep the view; `render` draws it at whatever size the panel has."""
        if self.changed(view):
            self._view = view
            self.refresh()

    def render(self) -> Text:
        """Bars of the current weights, then the final step's weight per epoch."""
        view = self._view
        text = Text(no_wrap=True, overflow="ellipsis")
        if view is None or not view.msl_weights:
            text.append("no train events yet", "dim")
            return text
        width = max(10, self.size.width)
        weights = view.msl_weights
        final_only = len(weights) > 1 and all(w == 0 for w in weights[:-1])
        if not view.msl_enabled:
            text.append("MSL disabled: final step only\n", "dim")
        elif final_only:
            text.append(f"MSL off since epoch {view.msl_epochs}: final only\n", "dim")
        else:
            text.append(f"epoch {view.epoch}: every step counts\n", "dim")
        bar_width = max(4, width - 14)
        for i, w in enumerate(weights):
            text.append(f"step {i + 1} ")
            text.append(bar(w, bar_width), STEP_COLORS[i % len(STEP_COLORS)])
            text.append(f" {w:.3f}\n")
        epochs = sorted(view.msl_by_epoch)
        finals = [view.msl_by_epoch[e][-1] for e in epochs]
        if finals:
            text.append("final-step weight by epoch\n", "dim")
            text.append(sparkline(finals, width - 14, lo=0.0, hi=1.0), "green")
            text.append(f" {finals[0]:.2f}→{finals[-1]:.2f}\n")
            cells = [f"e{e} {view.msl_by_epoch[e][-1]:.3f}" for e in epochs]
            per_line = max(1, width // 11)
            rows_left = max(1, self.size.height - len(weights) - 3)
            rows = [cells[i:i + per_line] for i in range(0, len(cells), per_line)]
            for row in rows[-rows_left:]:
                text.append("  ".join(row) + "\n")
        text.rstrip()
        return text


# ---------------------------------------------------------------- learned inner rates


class LslrPanel(Vertical, Panel):
    """The learned per-layer, per-step inner learning rates as a coloured heat map."""

    revision_key = "lslr"

    def __init__(self) -> None:
        super().__init__(id="lslr", classes="panel")
        self.border_title = "Learned inner LRs (layer × step)"

    def compose(self) -> ComposeResult:
        table: DataTable[Any] = DataTable(id="lslr-table", cursor_type="none",
                                          zebra_stripes=False, show_cursor=False)
        yield table

    def show(self, view: RunView) -> None:
        """Rebuild the heat map when an `lslr` event arrived (once per epoch)."""
        if not self.changed(view):
            return
        table = self.query_one("#lslr-table", DataTable)
        table.clear(columns=True)
        if not view.lslr_rates:
            self.border_subtitle = "waiting for the first lslr event"
            return
        steps = max(len(v) for v in view.lslr_rates.values())
        values = [v for rates in view.lslr_rates.values() for v in rates]
        lo, hi = min(values), max(values)
        table.add_column("tensor", key="tensor")
        for i in range(steps):
            table.add_column(f"step {i + 1}", key=f"step{i + 1}")
        for name, rates in view.lslr_rates.items():
            cells: list[Any] = [Text(name)]
            for v in rates:
                cells.append(Text(f" {rate(v)} ", style=heat_style(v, lo, hi), justify="right"))
            cells += [""] * (steps - len(rates))
            table.add_row(*cells, key=name)
        self.border_subtitle = f"epoch {view.lslr_epoch} · {rate(lo)}–{rate(hi)}"


# ---------------------------------------------------------------- validation and ensemble


class ValPanel(Vertical, Panel):
    """Validation accuracy per epoch with its 95% CI, the top-k marked; the ensemble result."""

    revision_key = "val"

    def __init__(self) -> None:
        super().__init__(id="val", classes="panel")
        self.border_title = "Validation accuracy"
        self._view: RunView | None = None
        self.ensemble_running = False

    def compose(self) -> ComposeResult:
        table: DataTable[Any] = DataTable(id="val-table", cursor_type="none",
                                          show_cursor=False)
        yield table
        yield Static(id="ensemble")

    def show(self, view: RunView) -> None:
        """Rebuild the table when validation, checkpoints or the ensemble changed."""
        if not self.changed(view):
            return
        self._view = view
        table = self.query_one("#val-table", DataTable)
        table.clear(columns=True)
        table.add_column("epoch", key="epoch")
        table.add_column("accuracy", key="accuracy")
        table.add_column("±95% CI", key="ci95")
        table.add_column("", key="bar")
        table.add_column(f"top-{view.top_k}", key="mark")
        for epoch, val in view.val.items():
            acc, ci = val.get("accuracy"), val.get("ci95")
            top = epoch in view.top_epochs
            style = "bold green" if top else ""
            mark = Text("★ top" if top else "", "bold yellow")
            if epoch in view.checkpoint_epochs:
                mark.append(" ckpt", "dim")
            table.add_row(Text(str(epoch), style), Text(pct(acc), style),
                          Text("—" if ci is None else f"±{100 * ci:.2f}", "dim"),
                          Text(bar(acc or 0.0, 10), "green" if top else "blue"), mark,
                          key=str(epoch))
        table.scroll_end(animate=False)
        self.border_subtitle = (f"best epoch {view.top_epochs[0]}: "
                                f"{pct(view.val[view.top_epochs[0]]['accuracy'])}"
                                if view.top_epochs else "no validation yet")
        self._draw_ensemble()

    def set_ensemble_running(self, running: bool) -> None:
        """Mark that the dashboard started an ensemble evaluation that has not reported yet."""
        self.ensemble_running = running
        self._draw_ensemble()

    def _draw_ensemble(self) -> None:
        view = self._view
        text = Text()
        text.append("Ensemble  ", "bold")
        result = view.ensemble if view else None
        if self.ensemble_running:
            text.append("running in the background…", "italic yellow")
            if result:
                text.append("\n")
        if result:
            members = ", ".join(str(m) for m in result.get("members") or [])
            text.append(f"epochs {members} → ")
            text.append(pct(result.get("accuracy")), "bold green")
            ci = result.get("ci95")
            text.append(f" ±{100 * ci:.2f}" if isinstance(ci, (int, float)) else "")
            text.append(f" on {result.get('tasks', '?')} test tasks")
            accs = result.get("member_accuracies") or []
            if accs:
                text.append("\n  members " + " · ".join(pct(a) for a in accs), "dim")
        elif not self.ensemble_running:
            text.append("not run yet (press e)" if view and view.val
                        else "possible after the first validated epoch", "dim")
        self.query_one("#ensemble", Static).update(text)


# ---------------------------------------------------------------- system


class SystemPanel(Widget, Panel):
    """GPU utilisation and memory of the engine's device, or its CPU and RAM without a GPU."""

    revision_key = "system"

    def __init__(self) -> None:
        super().__init__(id="system", classes="panel")
        self.border_title = "System"
        self._view: RunView | None = None

    def show(self, view: RunView) -> None:
        """Keep the view; the title says whether these are GPU or CPU figures."""
        if self.changed(view):
            self._view = view
            sample = view.system or {}
            if not sample:
                self.border_title = "System"
            else:
                self.border_title = ("GPU" if sample.get("gpu_util") is not None
                                     else "CPU (no GPU)")
            self.refresh()

    def render(self) -> Text:
        """Meters for the newest sample (live when the engine is local) and a sparkline."""
        view = self._view
        text = Text(no_wrap=True, overflow="ellipsis")
        sample = view.system if view else None
        if not sample:
            text.append("no system samples yet", "dim")
            return text
        width = max(12, self.size.width)

        def meter(label: str, value: str, fraction: float, color: str) -> None:
            head = f"{label:<9}{value:>15} "
            text.append(head)
            text.append(bar(fraction, max(3, width - len(head))), color)
            text.append("\n")

        source = ("live, sampled here" if view and view.system_source == "live"
                  else f"engine event {clock(sample.get('time', 0))}")
        gpu = sample.get("gpu_util") is not None
        text.append(f"{sample.get('device', '?')} · {source}\n", "dim")
        if gpu:
            util = float(sample["gpu_util"])
            used, total = sample.get("gpu_mem_used"), sample.get("gpu_mem_total")
            meter("GPU util", f"{util:.1f}%", util / 100, "green")
            if used is not None and total:
                meter("GPU mem", f"{used / 1024**3:.1f}/{total / 1024**3:.1f} GiB",
                      used / total, "magenta")
            text.append(f"CPU {sample.get('cpu_percent') or 0:.0f}%  "
                        f"RSS {gib(sample.get('rss'))}\n", "dim")
        else:
            cpu = float(sample.get("cpu_percent") or 0.0)
            cores = os.cpu_count() or 1
            meter("CPU", f"{cpu:.1f}%", cpu / (100 * cores), "green")
            text.append(f"RAM      {gib(sample.get('rss')):>15} resident\n")
        history = view.system_history if view else ()
        if history:
            label = "util " if gpu else "cpu  "
            text.append(label, "dim")
            text.append(sparkline(history, width - 6, lo=0.0), "cyan")
        text.rstrip()
        return text


# ---------------------------------------------------------------- log


_LOG_STYLES = {"info": "", "plain": "dim", "warning": "yellow", "error": "red",
               "event": "cyan", "good": "green"}


class LogPanel(RichLog, Panel):
    """engine.log's tail merged with the notable events (checkpoints, phases, state, errors)."""

    revision_key = "log"

    def __init__(self) -> None:
        super().__init__(id="log", classes="panel", max_lines=500, wrap=True, markup=False,
                         highlight=False, auto_scroll=True)
        self.border_title = "Log"

    def show(self, view: RunView) -> None:
        """Append the lines that are new since the last poll."""
        if not view.new_log or not self.changed(view):
            return
        for line in view.new_log:
            self.write_line(line)
        self._follow_tail()

    def on_resize(self, event: Resize) -> None:
        """Keep following the tail: a panel that got shorter would otherwise hide the newest
        lines below its old scroll position. (Textual also runs RichLog's own handler.)"""
        self._follow_tail()

    def _follow_tail(self) -> None:
        """Scroll to the newest line once the lines written so far are laid out: RichLog's own
        scroll on write can run before a batch written at start-up (deferred until the panel
        has a size) is measured, which once left a finished run's last line out of view."""
        if self.auto_scroll:
            self.call_after_refresh(self.scroll_end, animate=False, x_axis=False)

    def write_line(self, line: LogLine) -> None:
        """Append one line, prefixed with its file time."""
        text = Text(no_wrap=False)
        text.append(clock(line.time) + " ", "dim")
        text.append(line.text, _LOG_STYLES.get(line.kind, ""))
        self.write(text)
