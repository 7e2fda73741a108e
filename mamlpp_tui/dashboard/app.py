"""The live dashboard: a Textual app that watches one run directory and steers its engine.

How it stays out of the engine's way and stays responsive:

- It reads only the run directory and writes only `control.json` (via `engine.control.send`),
  so it works on any run, on any terminal, and closing it never affects the run.
- A timer starts one polling worker thread at a time; the worker does all the file and NVML
  I/O (`RunWatcher.poll`) and hands back an immutable `RunView`, which the UI thread only
  draws. Sending a command and starting the ensemble also happen in worker threads.
- `p` decides between pause and unpause from the state the engine last reported, and the
  header says "pause sent" until the engine's status confirms it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Label
from textual.worker import Worker, WorkerState

from engine import control
from engine.errors import UserError
from engine.paths import runs_root
from mamlpp_tui.dashboard.reader import RunView, RunWatcher
from mamlpp_tui.dashboard.widgets import (
    LogPanel,
    LossPanel,
    LslrPanel,
    MslPanel,
    RunHeader,
    SystemPanel,
    ValPanel,
)

POLL_S = 0.5
LIVE_STATES = ("running", "paused")


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question; dismisses with True for yes. Stopping a run deserves a second key."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n", "answer(False)", "No"),
        Binding("escape", "answer(False)", "Cancel", show=False),
    ]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm"):
            yield Label(self.question, id="confirm-question")
            with Horizontal(id="confirm-buttons"):
                yield Button("Yes, stop (y)", variant="error", id="yes")
                yield Button("No (n)", variant="primary", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class DashboardApp(App[None]):
    """Watches and steers one run: `DashboardApp(run_dir).run()`."""

    CSS_PATH = "dashboard.tcss"
    TITLE = "mamlpp"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("p", "toggle_pause", "Pause/unpause"),
        Binding("e", "ensemble", "Ensemble"),
        Binding("c", "checkpoint", "Checkpoint"),
        Binding("s", "stop", "Stop run"),
        Binding("q", "quit", "Close (run goes on)"),
    ]
    HORIZONTAL_BREAKPOINTS: ClassVar[list[tuple[int, str]]] = [(0, "-narrow"), (100, "-wide")]
    VERTICAL_BREAKPOINTS: ClassVar[list[tuple[int, str]]] = [(0, "-short"), (34, "-tall")]

    def __init__(self, run_dir: Path, *, poll_s: float = POLL_S,
                 local_sampling: bool = True) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.poll_s = poll_s
        self.watcher = RunWatcher(self.run_dir, local_sampling=local_sampling)
        self.view: RunView | None = None
        self.ensemble_process: subprocess.Popen[bytes] | None = None
        self._ensemble_seen: float | None = None
        self._awaiting_result = False
        self._pending: tuple[str, str] | None = None  # (command, state that confirms it)
        self._polling = False
        self.sub_title = self.watcher.run.run_id

    # -- layout

    def compose(self) -> ComposeResult:
        yield RunHeader()
        with VerticalScroll(id="body"):
            with Horizontal(id="row-charts", classes="row"):
                yield LossPanel()
                yield MslPanel()
            with Horizontal(id="row-tables", classes="row"):
                yield ValPanel()
                yield LslrPanel()
            with Horizontal(id="row-bottom", classes="row"):
                yield SystemPanel()
                yield LogPanel()
        yield Footer()

    def on_mount(self) -> None:
        # held here because `query_one` searches the active screen, which is the stop
        # confirmation while it is open, and polls keep arriving then
        self.header = self.query_one(RunHeader)
        self.panels = (self.query_one(LossPanel), self.query_one(MslPanel),
                       self.query_one(ValPanel), self.query_one(LslrPanel),
                       self.query_one(SystemPanel), self.query_one(LogPanel))
        self.val_panel = self.query_one(ValPanel)
        self.set_interval(self.poll_s, self.request_poll)
        self.request_poll()

    # -- polling

    def request_poll(self) -> None:
        """Start a poll unless one is still running (a slow disk must not pile up threads)."""
        if self._polling:
            return
        self._polling = True
        self._poll()

    @work(thread=True, group="poll", exit_on_error=False)
    def _poll(self) -> RunView:
        return self.watcher.poll()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        worker = event.worker
        if worker.group == "poll":
            if event.state == WorkerState.SUCCESS and isinstance(worker.result, RunView):
                self.apply_view(worker.result)
            if event.state in (WorkerState.SUCCESS, WorkerState.ERROR, WorkerState.CANCELLED):
                self._polling = False
            if event.state == WorkerState.ERROR:
                self.notify(f"Could not read the run: {worker.error}", severity="error")
        elif event.state == WorkerState.ERROR:
            if worker.group == "ensemble":
                self.val_panel.set_ensemble_running(False)
            self.notify(str(worker.error), severity="error", timeout=8)

    def apply_view(self, view: RunView) -> None:
        """Draw a fresh view on every panel (each skips the work when its data is unchanged)."""
        if not self.header.is_attached:
            return  # a poll that finished while the app was closing
        self.view = view
        if self._pending and view.state != "unknown":
            _command, confirm = self._pending
            if view.state == confirm or view.state not in LIVE_STATES:
                self._pending = None
                self.header.pending = None
        self.header.show(view)
        for panel in self.panels:
            panel.show(view)
        self._check_ensemble(view, self.val_panel)

    def _check_ensemble(self, view: RunView, val: ValPanel) -> None:
        """Follow an ensemble started with `e`: done when ensemble.json changes; failed when
        the process exits non-zero (its output is in the log panel via ensemble.log)."""
        process = self.ensemble_process
        if process is None and not self._awaiting_result:
            return
        if view.ensemble_mtime is not None and view.ensemble_mtime != self._ensemble_seen:
            self._ensemble_seen = view.ensemble_mtime
            self.ensemble_process = None
            self._awaiting_result = False
            val.set_ensemble_running(False)
            acc = (view.ensemble or {}).get("accuracy")
            if isinstance(acc, (int, float)):
                self.notify(f"Ensemble: {100 * acc:.2f}% test accuracy", title="Ensemble done")
            return
        if process is not None:
            code = process.poll()
            if code is None:
                return
            self.ensemble_process = None
            if code == 0:  # written just before it exited: the next poll reads it
                self._awaiting_result = True
                return
            val.set_ensemble_running(False)
            self.notify(f"The ensemble evaluation failed (exit {code}); see the log panel and "
                        f"{self.run_dir / 'ensemble.log'}.", severity="error", timeout=10)
        else:  # exited cleanly a poll ago yet ensemble.json did not change
            self._awaiting_result = False
            val.set_ensemble_running(False)

    # -- commands

    def _send(self, command: str, confirm: str | None, pending: str) -> None:
        """Queue `command`; the header shows `pending` until the status shows `confirm`
        (or for a few seconds when nothing in the status confirms it, as for checkpoint)."""
        self._pending = (command, confirm or "")
        self.header.set_pending(pending)
        token = self._pending
        self.set_timer(3.0 if confirm is None else 30.0, lambda: self._clear_pending(token))
        self._send_in_thread(command)

    def _clear_pending(self, token: tuple[str, str]) -> None:
        if self._pending is token:
            self._pending = None
            self.header.set_pending(None)

    @work(thread=True, group="control", exit_on_error=False)
    def _send_in_thread(self, command: str) -> None:
        control.send(self.run_dir, command)

    def _live_state(self, what: str) -> str | None:
        """The run's state if the engine is there to obey `what`, else say why not; None."""
        state = self.view.state if self.view else "unknown"
        if state in LIVE_STATES:
            return state
        message = f"The run is {state}; there is no engine to {what}."
        if state in ("stopped", "failed"):
            message += f" Continue it with `mamlpp resume {self.watcher.run.run_id}`."
        self.notify(message, severity="warning")
        return None

    def action_toggle_pause(self) -> None:
        """`p`: pause a running engine, unpause a paused one."""
        state = self._live_state("pause")
        if state == "running":
            self._send("pause", "paused", "pause sent")
        elif state == "paused":
            self._send("unpause", "running", "unpause sent")

    def action_checkpoint(self) -> None:
        """`c`: ask the engine to save a checkpoint at its next iteration."""
        if self._live_state("checkpoint"):
            self._send("checkpoint", None, "checkpoint sent")
            self.notify("Checkpoint requested; it is saved after the current iteration.")

    def action_stop(self) -> None:
        """`s`: stop the run after a y/n confirmation (it saves a checkpoint and exits)."""
        if isinstance(self.screen, ConfirmScreen) or not self._live_state("stop"):
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self._send("stop", "stopped", "stop sent")

        self.push_screen(ConfirmScreen(f"Stop run {self.watcher.run.run_id}? It saves a "
                                       "checkpoint and can be resumed later."), answered)

    def ensemble_command(self) -> list[str]:
        """The command line of a background ensemble evaluation of this run."""
        return [sys.executable, "-m", "mamlpp_tui", "ensemble", self.watcher.run.run_id,
                "--plain"]

    def action_ensemble(self) -> None:
        """`e`: evaluate the top-k ensemble now, in a detached process; the result shows up
        when ensemble.json changes. Detached, so closing the dashboard does not cancel it."""
        if self.val_panel.ensemble_running:  # set from this key press until the result
            self.notify("An ensemble evaluation is already running.", severity="warning")
            return
        if self.view is not None and not self.view.val:
            self.notify("The ensemble needs at least one validated epoch.", severity="warning")
            return
        self._ensemble_seen = self.view.ensemble_mtime if self.view else None
        self.val_panel.set_ensemble_running(True)
        self._spawn_ensemble()

    @work(thread=True, group="ensemble", exit_on_error=False)
    def _spawn_ensemble(self) -> None:
        if self.run_dir.resolve().parent != runs_root().resolve():
            raise UserError(f"This run is not under {runs_root()}, so `mamlpp ensemble` cannot "
                            "find it; set MAMLPP_HOME to the folder above its runs/ folder.")
        with open(self.run_dir / "ensemble.log", "ab") as log:
            process = subprocess.Popen(
                self.ensemble_command(), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ))
        self.call_from_thread(self._ensemble_started, process)

    def _ensemble_started(self, process: subprocess.Popen[bytes]) -> None:
        self.ensemble_process = process
        self.notify(f"Ensemble evaluation started (pid {process.pid}).")


def run_dashboard(run_dir: Path) -> None:
    """Open the dashboard on `run_dir` until the person presses q; the run is not affected."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir} is not a run directory (it has no config.json); list runs "
                        "with `mamlpp runs`.")
    DashboardApp(run_dir).run()
