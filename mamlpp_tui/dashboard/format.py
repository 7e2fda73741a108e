"""Small text-drawing helpers shared by the panels: bars, sparklines, colour scales, units.

Kept free of Textual so that they can be tested and reused (e.g. by a plain-text status line).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

_BLOCKS = " ▏▎▍▌▋▊▉█"
_SPARKS = "▁▂▃▄▅▆▇█"
# viridis, 5 stops: readable on dark and light terminals, monotone in lightness, colour-blind safe
_VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))

STATE_STYLES = {
    "running": "bold green",
    "paused": "bold yellow",
    "stopped": "bold yellow",
    "finished": "bold cyan",
    "failed": "bold red",
}


def bar(fraction: float, width: int) -> str:
    """A bar of `width` cells filled to `fraction` (clamped to 0..1) in 1/8-cell steps."""
    width = max(0, width)
    fraction = min(1.0, max(0.0, fraction))
    eighths = round(fraction * width * 8)
    full, rest = divmod(eighths, 8)
    text = "█" * full + (_BLOCKS[rest] if rest else "")
    return text.ljust(width)[:width]


def sparkline(values: Sequence[float | None], width: int,
              lo: float | None = None, hi: float | None = None) -> str:
    """The last `width` values as one line of ▁..█ (None shows as a space)."""
    values = list(values)[-max(0, width):]
    numbers = [v for v in values if v is not None]
    if not numbers:
        return ""
    lo = min(numbers) if lo is None else lo
    hi = max(numbers) if hi is None else hi
    span = hi - lo
    out = []
    for v in values:
        if v is None:
            out.append(" ")
        elif span <= 0:
            out.append(_SPARKS[len(_SPARKS) // 2])
        else:
            i = round((min(hi, max(lo, v)) - lo) / span * (len(_SPARKS) - 1))
            out.append(_SPARKS[i])
    return "".join(out)


def heat_rgb(value: float, lo: float, hi: float) -> tuple[int, int, int]:
    """`value`'s colour on the viridis scale between `lo` and `hi` (the middle when lo == hi)."""
    t = 0.5 if hi <= lo else min(1.0, max(0.0, (value - lo) / (hi - lo)))
    pos = t * (len(_VIRIDIS) - 1)
    i = min(int(pos), len(_VIRIDIS) - 2)
    f = pos - i
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    r, g, bl = (round(a[k] + (b[k] - a[k]) * f) for k in range(3))
    return r, g, bl


def heat_style(value: float, lo: float, hi: float) -> str:
    """A Rich style with `value`'s heat colour as background and a readable foreground."""
    r, g, b = heat_rgb(value, lo, hi)
    luminance = 0.299 * r + 0.587 * g + 0.114 * b
    fg = "black" if luminance > 140 else "white"
    return f"{fg} on rgb({r},{g},{b})"


def duration(seconds: float | None) -> str:
    """`1:02:03` / `2:03`, or `—` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "—"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def gib(n_bytes: float | None) -> str:
    """Bytes as GiB (or MiB when small)."""
    if n_bytes is None:
        return "—"
    if n_bytes < 1024**3:
        return f"{n_bytes / 1024**2:.0f} MiB"
    return f"{n_bytes / 1024**3:.2f} GiB"


def pct(fraction: float | None, digits: int = 2) -> str:
    """A fraction as a percentage (`—` when unknown)."""
    return "—" if fraction is None else f"{100 * fraction:.{digits}f}%"


def clock(timestamp: float) -> str:
    """Local `HH:MM:SS` of a file timestamp (never of 'now', so views are reproducible)."""
    return time.strftime("%H:%M:%S", time.localtime(timestamp)) if timestamp else "--:--:--"


def rate(value: float) -> str:
    """A learned learning rate, 4 decimals (scientific when tiny or huge)."""
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e3:
        return f"{value:.4f}"
    return f"{value:.2e}"
