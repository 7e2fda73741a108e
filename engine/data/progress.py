"""Progress reporting for long data jobs, without any UI import.

Engine code calls a `Reporter`; the CLI passes one that draws a rich progress bar on a terminal
or prints plain lines otherwise. The default reporter says nothing.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Reporter:
    """One job at a time: `start(description, total)`, `advance(n)`..., `done()`; `note(text)`."""

    def start(self, description: str, total: int | None = None, unit: str = "items") -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def done(self) -> None:
        pass

    def note(self, message: str) -> None:
        pass


class LineReporter(Reporter):
    """Plain lines (logs, pipes): one at start, every 10% (or `every_s` s), and when done."""

    def __init__(self, stream: TextIO | None = None, every_s: float = 5.0) -> None:
        self.stream = stream
        self.every_s = every_s
        self._desc = ""
        self._total: int | None = None
        self._unit = "items"
        self._count = 0
        self._last_decile = -1
        self._last_time = 0.0
        self._t0 = 0.0

    def _print(self, text: str) -> None:
        stream = self.stream or sys.stdout
        print(text, file=stream, flush=True)

    def _amount(self, n: int) -> str:
        if self._unit == "bytes":
            return f"{n / 1e6:.1f} MB"
        return f"{n}"

    def start(self, description: str, total: int | None = None, unit: str = "items") -> None:
        self._desc, self._total, self._unit = description, total, unit
        self._count, self._last_decile = 0, 0
        self._t0 = self._last_time = time.monotonic()
        size = ""
        if total:
            size = f" ({self._amount(total)}{'' if unit == 'bytes' else ' ' + unit})"
        self._print(f"{description}{size} ...")

    def advance(self, n: int = 1) -> None:
        self._count += n
        now = time.monotonic()
        if self._total:
            decile = min(10, self._count * 10 // self._total)
            if decile > self._last_decile and decile < 10:
                self._last_decile = decile
                self._last_time = now
                self._print(f"{self._desc}: {decile * 10}% ({self._amount(self._count)}"
                            f" of {self._amount(self._total)})")
        elif now - self._last_time >= self.every_s:
            self._last_time = now
            self._print(f"{self._desc}: {self._amount(self._count)}")

    def done(self) -> None:
        self._print(f"{self._desc}: done ({self._amount(self._count)}"
                    f"{'' if self._unit == 'bytes' else ' ' + self._unit},"
                    f" {time.monotonic() - self._t0:.1f} s)")

    def note(self, message: str) -> None:
        self._print(message)
