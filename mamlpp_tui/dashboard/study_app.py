"""The study view (`mamlpp watch STUDY`): the members with their state, progress and result, and
the study's live result table. Enter on a member opens that run's dashboard; Escape there comes
back here (to the same member).

Like the run dashboard it only reads files (study.json, the members' run directories), in a
worker thread, one poll at a time, so it opens on any study, running here, elsewhere or not at
all. The run dashboard is its own Textual app (`DashboardApp`, unchanged); `run_study_dashboard`
alternates the two apps, which is what lets Escape in a run's dashboard return here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Footer, Static
from textual.worker import Worker, WorkerState

from engine.errors import UserError
from engine.paths import runs_root
from engine.studies import Study, load_study, member_runs
from engine.study_results import study_table
from engine.study_runner import MemberProgress, RateTracker, study_eta
from mamlpp_tui.dashboard.app import DashboardApp
from mamlpp_tui.study_tables import duration, members_cells, results_table, title

POLL_S = 1.0
MEMBER_COLUMNS = ("variant", "seed", "state", "progress", "test acc %")
STATE_STYLES = {"finished": "green", "running": "bold cyan", "paused": "yellow",
                "failed": "bold red", "stopped": "yellow", "deleted": "bold red",
                "not started": "dim"}


@dataclass(frozen=True)
class StudyView:
    """Everything the view draws, read in one poll."""

    table: dict[str, Any]  # engine.study_results.study_table
    members: list[dict[str, Any]]  # the table's members, each with its "variant"
    runner_pid: int | None
    eta_s: float | None
    error: str | None = None
    counts: dict[str, int] = field(default_factory=dict)


class StudyWatcher:
    """Reads a study's files into StudyViews; keeps member rates between polls for the ETA."""

    def __init__(self, study: Study) -> None:
        self.study = study
        self.rates = RateTracker()

    def poll(self) -> StudyView:
        study = self.study
        error = None
        try:
            members = member_runs(study, strict=True)
        except UserError as e:
            error = str(e)
            members = member_runs(study, strict=False)
        table = study_table(study, members)
        rows = [dict(m, variant=r["variant"]) for r in table["rows"] for m in r["members"]]
        now = time.monotonic()
        progress = []
        for m in rows:
            if m["run"] and m["state"] in ("running", "paused"):
                self.rates.add(m["run"], m["iteration"], now)
            rate = self.rates.rate(m["run"], now) if m["run"] else None
            progress.append(MemberProgress(m["variant"], m["seed"], m["run"], m["state"],
                                           m["iteration"], m["total_iterations"], rate))
        running = sum(1 for m in rows if m["state"] == "running")
        counts: dict[str, int] = {}
        for m in rows:
            counts[m["state"]] = counts.get(m["state"], 0) + 1
        eta = study_eta(progress, max(1, running)) if running else None
        return StudyView(table, rows, study.runner_pid() if study.is_running() else None, eta,
                         error, counts)


class StudyHeader(Static):
    """Study id, what it is, its state, members per state and the ETA."""

    def show(self, view: StudyView) -> None:
        t = view.table
        text = Text(title(t), style="bold")
        counts = ", ".join(f"{n} {state}" for state, n in sorted(view.counts.items()))
        text.append(f"\n{counts}", style="")
        if view.runner_pid:
            text.append(f" · study process pid {view.runner_pid}")
        if view.eta_s is not None:
            text.append(f" · ETA {duration(view.eta_s)}")
        if view.error:
            text.append(f"\n{view.error}", style="bold red")
        self.update(text)


class MembersPanel(DataTable):
    """One row per member; the cursor row is the member Enter opens (its run id is shown whole
    in the MemberDetail line below, which no terminal width cuts)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "select_cursor", "Open the member's dashboard"),
    ]

    def on_mount(self) -> None:
        self.border_title = "members"
        self.cursor_type = "row"
        self.zebra_stripes = True
        for name in MEMBER_COLUMNS:
            self.add_column(name, key=name)
        self._rows: list[list[str]] = []
        self.run_ids: list[str | None] = []

    def show(self, view: StudyView) -> None:
        rows = [members_cells(m) for m in view.members]
        if rows == self._rows:
            return
        keep = self.cursor_row
        self.clear()
        for cells in rows:
            state = cells[2]
            self.add_row(*cells[:2], Text(state, style=STATE_STYLES.get(state, "")),
                         *cells[3:5])
        self._rows = rows
        self.run_ids = [m["run"] if m["state"] != "deleted" else None for m in view.members]
        if rows:
            self.move_cursor(row=min(max(keep, 0), len(rows) - 1))


class MemberDetail(Static):
    """The member under the cursor: its run id, whole, and what Enter does."""

    def show(self, member: dict[str, Any] | None) -> None:
        if member is None:
            self.update("")
            return
        label = f"{member['variant']} seed {member['seed']}"
        if member["state"] == "deleted":
            self.update(Text(f"{label}: run {member['run']} was deleted", style="bold red"))
        elif member["run"] is None:
            self.update(f"{label}: no run yet")
        else:
            self.update(Text.assemble((f"{label}: run ", ""), (member["run"], "bold"),
                                      (" · Enter opens its dashboard", "dim")))


class ResultsPanel(Static):
    """The live result table (what `mamlpp study show` prints), fitted to the panel."""

    def on_mount(self) -> None:
        self.border_title = "results"
        self.border_subtitle = "mean ± std over seeds"
        self.table: dict[str, Any] | None = None

    def show(self, view: StudyView) -> None:
        self.table = view.table
        self._draw()

    def on_resize(self) -> None:
        self._draw()

    def _draw(self) -> None:
        if self.table is not None:
            width = max(20, self.content_size.width or self.size.width - 4)
            self.update(results_table(self.table, width, titled=False))


class StudyApp(App[tuple[str, int] | None]):
    """`StudyApp(study).run()` returns (run id, member row) when Enter picks a member, or None
    when the person closes it."""

    CSS_PATH = "study.tcss"
    TITLE = "mamlpp study"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS: ClassVar[list[BindingType]] = [Binding("q", "quit", "Close")]

    def __init__(self, study: Study, *, poll_s: float = POLL_S, cursor_row: int = 0) -> None:
        super().__init__()
        self.study = study
        self.poll_s = poll_s
        self.start_row = cursor_row
        self.watcher = StudyWatcher(study)
        self.view: StudyView | None = None
        self._polling = False
        self.sub_title = study.id

    def compose(self) -> ComposeResult:
        yield StudyHeader(id="study-header")
        yield MembersPanel(id="members")
        yield MemberDetail(id="member-detail")
        with VerticalScroll(id="results-scroll"):
            yield ResultsPanel(id="results")
        yield Footer()

    def on_mount(self) -> None:
        self.header = self.query_one(StudyHeader)
        self.members = self.query_one(MembersPanel)
        self.detail = self.query_one(MemberDetail)
        self.results = self.query_one(ResultsPanel)
        self.members.focus()
        self.set_interval(self.poll_s, self.request_poll)
        self.request_poll()

    def request_poll(self) -> None:
        if self._polling:
            return
        self._polling = True
        self._poll()

    @work(thread=True, group="poll", exit_on_error=False)
    def _poll(self) -> StudyView:
        return self.watcher.poll()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker.group != "poll":
            return
        if event.state == WorkerState.SUCCESS and isinstance(event.worker.result, StudyView):
            self.apply_view(event.worker.result)
        if event.state in (WorkerState.SUCCESS, WorkerState.ERROR, WorkerState.CANCELLED):
            self._polling = False
        if event.state == WorkerState.ERROR:
            self.notify(f"Could not read the study: {event.worker.error}", severity="error")

    def apply_view(self, view: StudyView) -> None:
        if not self.header.is_attached:
            return
        first = self.view is None
        self.view = view
        self.header.show(view)
        self.members.show(view)
        self.results.show(view)
        if first and view.members:
            self.members.move_cursor(row=min(self.start_row, len(view.members) - 1))
        self._show_detail()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_detail()

    def _show_detail(self) -> None:
        row = self.members.cursor_row
        members = self.view.members if self.view else []
        self.detail.show(members[row] if 0 <= row < len(members) else None)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_open_member()

    def action_open_member(self) -> None:
        """Enter: close this view and open the member's run dashboard (Escape comes back)."""
        row = self.members.cursor_row
        run_ids = self.members.run_ids
        if not run_ids or row < 0 or row >= len(run_ids):
            return
        run_id = run_ids[row]
        if run_id is None:
            self.notify("This member has no run yet; `mamlpp study resume "
                        f"{self.study.id}` starts it.", severity="warning")
            return
        self.exit((run_id, row))


class MemberDashboardApp(DashboardApp):
    """A member's run dashboard, opened from the study view: Escape goes back to it."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "back", "Back to the study")]

    def __init__(self, run_dir: Path, study_id: str, **kwargs: Any) -> None:
        super().__init__(run_dir, **kwargs)
        self.sub_title = f"{self.sub_title} · study {study_id}"

    def action_back(self) -> None:
        self.exit("back")


def run_study_dashboard(study: Study) -> None:
    """The study view until the person closes it, with member dashboards in between."""
    row = 0
    while True:
        picked = StudyApp(load_study(study.path), cursor_row=row).run()
        if not picked:
            return
        run_id, row = picked
        if MemberDashboardApp(runs_root() / run_id, study.id).run() != "back":
            return
