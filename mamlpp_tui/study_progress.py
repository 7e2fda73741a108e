"""What a study command shows while its members run: on a terminal, a live panel (members done,
running and queued, each running member's iteration, speed and ETA, the study's ETA); otherwise
plain lines (each member starting and ending, and a summary every PLAIN_EVERY_S)."""

from __future__ import annotations

import time

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from engine.study_runner import StudySnapshot
from mamlpp_tui.study_tables import duration
from mamlpp_tui.tables import Column, fitted_table

PLAIN_EVERY_S = 30.0
SHOWN_STATES = ("running", "waiting")


def summary_line(s: StudySnapshot) -> str:
    done = s.count("finished")
    running = s.count("running")
    waiting = s.count("waiting")
    queued = s.count("queued")
    failed = s.count("failed", "stopped")
    parts = [f"study {s.study_id}: {done}/{len(s.members)} done", f"{running} running"]
    if waiting:
        parts.append(f"{waiting} in another process")
    parts.append(f"{queued} queued")
    if failed:
        parts.append(f"{failed} failed or stopped")
    parts.append(f"elapsed {duration(s.elapsed_s)}")
    parts.append("stopping" if s.stopping else f"ETA {duration(s.eta_s)}")
    return ", ".join(parts)


class StudyProgressDisplay:
    """`snapshot` and `message` are the StudyRunner's callbacks."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self.tty = self.console.is_terminal
        self.last_plain = 0.0
        self.live: Live | None = None
        if self.tty:
            self.live = Live(Text("starting the study"), console=self.console,
                             refresh_per_second=4, transient=False)
            self.live.start()

    def message(self, text: str) -> None:
        if self.live is not None:
            self.live.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def snapshot(self, s: StudySnapshot) -> None:
        if self.live is not None:
            self.live.update(self._render(s))
            return
        now = time.monotonic()
        if now - self.last_plain >= PLAIN_EVERY_S:
            self.last_plain = now
            running = [f"{m.variant} seed {m.seed} {m.iteration}/{m.total} ETA "
                       f"{duration(m.eta_s)}" for m in s.members if m.state == "running"]
            print(summary_line(s) + ("; " + "; ".join(running) if running else ""), flush=True)

    def _render(self, s: StudySnapshot) -> Group:
        height = self.console.height
        members = s.members
        if len(members) + 8 > height:  # only what is moving
            members = [m for m in members if m.state in SHOWN_STATES]
        rows = []
        for m in members:
            bar = _bar(m.iteration, m.total, 12) if m.state in SHOWN_STATES else ""
            rows.append([m.variant, str(m.seed), m.state, f"{m.iteration}/{m.total}", bar,
                         "-" if m.rate is None else f"{m.rate:.2f}", duration(m.eta_s),
                         m.run_id or "-"])
        table = fitted_table(
            [Column("variant", identifying=True), Column("seed", identifying=True),
             Column("state", identifying=True), Column("iteration", priority=8),
             Column("progress", priority=3), Column("it/s", priority=4),
             Column("ETA", priority=7), Column("run", priority=2)],
            rows, self.console.width, note="`mamlpp study show` or `mamlpp watch` shows all")
        return Group(Text(summary_line(s), style="bold"), table)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


def _bar(done: int, total: int, width: int) -> str:
    if not total:
        return ""
    filled = round(width * min(1.0, done / total))
    return "█" * filled + "░" * (width - filled)
