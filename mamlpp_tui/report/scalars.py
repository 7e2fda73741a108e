"""A run's events as tidy scalars: one row per event and metric, what both exports write.

Why one flattening for both: the TensorBoard tags and the CSV rows then hold the same numbers
by construction, and a reader of either can find a value by the same four coordinates
(metric, layer, step, member). Rules:

- The event types with numbers a person plots: `train`, `val`, `lslr`, `ensemble`, `system`.
  (`checkpoint` repeats the validation accuracy; `state` holds words, not numbers.)
- One event per (type, iteration), the last one written (`rundata.one_per_iteration`).
- Numbers only: null (a diverged loss, a step whose loss is no longer computed, no GPU) is left
  out rather than written as a fake value; booleans (`second_order`) become 0 and 1.
- Inner steps are numbered 1..N, as the dashboard labels them; ensemble members by their epoch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from mamlpp_tui.report.rundata import number, one_per_iteration

TYPES = ("train", "val", "lslr", "ensemble", "system")
_SKIP = {"type", "time", "iteration", "epoch", "world_size", "members"}
_PER_STEP = {"step_losses": "step_loss", "msl_weights": "msl_weight"}
_PER_MEMBER = {"member_accuracies": "member_accuracy", "member_ci95": "member_ci95",
               "member_val_accuracies": "member_val_accuracy"}
COLUMNS = ("run", "type", "iteration", "epoch", "time", "metric", "layer", "step", "member",
           "value")


class Scalar(NamedTuple):
    type: str
    iteration: int
    epoch: int
    time: float | None
    metric: str
    layer: str | None
    step: int | None
    member: int | None
    value: float

    @property
    def tag(self) -> str:
        """The TensorBoard tag: `type/metric[/layer][/step_N][/epoch_E]`."""
        parts = [self.type, self.metric]
        if self.layer is not None:
            parts.append(self.layer)
        if self.step is not None:
            parts.append(f"step_{self.step}")
        if self.member is not None:
            parts.append(f"epoch_{self.member}")
        return "/".join(parts)


def _value(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    return number(value)


def event_scalars(event: dict[str, Any]) -> Iterator[Scalar]:
    """The numeric metrics of one event."""
    kind = event["type"]
    it, epoch = event["iteration"], int(event.get("epoch") or 0)
    when = number(event.get("time"))

    def row(metric: str, value: Any, layer: str | None = None, step: int | None = None,
            member: int | None = None) -> Iterator[Scalar]:
        v = _value(value)
        if v is not None:
            yield Scalar(kind, it, epoch, when, metric, layer, step, member, v)

    members = event.get("members") if isinstance(event.get("members"), list) else []
    for key, value in event.items():
        if key in _SKIP:
            continue
        if kind == "lslr" and key == "rates" and isinstance(value, dict):
            for layer, rates in value.items():
                for i, rate in enumerate(rates if isinstance(rates, list) else []):
                    yield from row("rate", rate, layer=str(layer), step=i + 1)
        elif key in _PER_MEMBER and isinstance(value, list):
            for member, v in zip(members, value):
                if isinstance(member, int):
                    yield from row(_PER_MEMBER[key], v, member=member)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                yield from row(_PER_STEP.get(key, key), v, step=i + 1)
        elif not isinstance(value, (dict, str)):
            yield from row(key, value)


def run_scalars(events: Iterable[dict[str, Any]]) -> list[Scalar]:
    """Every scalar of a run's events, by type in `TYPES` order, then iteration."""
    series = one_per_iteration(list(events))
    return [s for kind in TYPES for event in series.get(kind, []) for s in event_scalars(event)]


def config_rows(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(dotted key, value as JSON: `true`, `0.001`, `"loop"`) for every key of config.json,
    the recorded runtime included."""
    rows = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            rows.append((prefix, json.dumps(value)))

    walk("", config)
    return rows
