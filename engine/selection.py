"""Which epochs make the test ensemble (SPEC 4), in one place.

The trainer's ensemble, checkpoint retention, `mamlpp predict`'s members, the dashboard's top-k
marks and the reports all rank validated epochs with `top_k_epochs`, so what one of them calls
the top k is what the others use. No torch here: readers of a run directory import it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any


def _accuracy(entry: Mapping[str, Any]) -> float | None:
    value = entry.get("accuracy")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def top_k_epochs(history: Iterable[Mapping[str, Any]], k: int) -> list[int]:
    """The epochs of the k highest validation accuracies, best first; a tie goes to the earlier
    epoch. `history` holds {"epoch", "accuracy"} entries (the trainer's and a checkpoint's
    history, `val` events); an entry without a finite accuracy never counts."""
    scored = [(-acc, int(entry["epoch"])) for entry in history
              if (acc := _accuracy(entry)) is not None]
    return [epoch for _, epoch in sorted(scored)[:max(0, k)]]
