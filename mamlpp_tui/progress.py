"""Foreground progress for `--no-tui`: a rich bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from engine.trainer import Progress as EngineProgress

PLAIN_EVERY_S = 10.0


class ProgressDisplay:
    """Callable the trainer calls after every iteration and every validation."""

    def __init__(self, total: int, console: Console | None = None) -> None:
        self.console = console or Console(stderr=False)
        self.tty = self.console.is_terminal
        self.last_plain = 0.0
        self.val: float | None = None
        self.bar: Progress | None = None
        if self.tty:
            self.bar = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                TextColumn("{task.fields[speed]:.2f} it/s  loss {task.fields[loss]}  "
                           "acc {task.fields[acc]}  val {task.fields[val]}"),
                console=self.console,
            )
            self.task = self.bar.add_task("train", total=total, epoch=0, speed=0.0, loss="-",
                                          acc="-", val="-")
            self.bar.start()

    def __call__(self, p: EngineProgress) -> None:
        if p.val_accuracy is not None:
            self.val = p.val_accuracy
        loss = f"{p.metrics.loss:.3f}" if p.metrics else "-"
        acc = f"{p.metrics.accuracy:.3f}" if p.metrics else "-"
        val = f"{self.val:.3f}" if self.val is not None else "-"
        if self.bar is not None:
            self.bar.update(self.task, completed=p.iteration, epoch=p.epoch, speed=p.iters_per_sec,
                            loss=loss, acc=acc, val=val)
            return
        now = time.monotonic()
        if p.metrics is None or now - self.last_plain > PLAIN_EVERY_S or p.iteration == p.total:
            self.last_plain = now
            what = "validation" if p.metrics is None else "train"
            print(f"{what} iteration {p.iteration}/{p.total} epoch {p.epoch} "
                  f"it/s {p.iters_per_sec:.2f} loss {loss} acc {acc} val {val}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        sys.stdout.flush()
