"""The terminal the commands print to."""

from __future__ import annotations

from typing import Any

from rich.console import Console


class _Terminal:
    """rich's Console as the terminal is when a command prints: a Console made per use, so its
    width follows the window (or COLUMNS) at that moment. A module-level Console freezes both
    at import. Live displays (progress bars) need one Console for their life: give them
    `Console()` itself."""

    def __getattr__(self, name: str) -> Any:
        return getattr(Console(), name)


console = _Terminal()
