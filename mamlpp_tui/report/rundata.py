"""One run's directory as the reports need it: what the dashboard reader folds from it, every
event once per iteration, and what the engine's own schedules say the run should do.

Why it looks like this:

- Validation per epoch, the top-k epochs, the ensemble result, the MSL weights per epoch, the
  learned rates now, the device and the loss curves come from the dashboard's `RunWatcher`
  (one poll, no live sampling), so a report shows exactly what the dashboard shows and the
  parsing (checkpoint-history fallback, ensemble file over event, malformed events) lives once.
- The exports and the histories the dashboard does not keep (meta learning rate, learned rates
  over epochs) come from the full event stream, one event per (type, iteration): after a resume
  the engine redoes iterations, and the newer copy is the true one (engine/events.py).
- The MSL weights, the derivative-order phase and the cosine meta learning rate the report
  draws as "planned" are the engine's functions on the run's config, never a copy of them.
- Whatever the run's state (running, paused, stopped, finished, failed), this reads what is
  there; parts that do not exist yet are empty, and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.events import read_events
from engine.run_store import RunDir
from mamlpp_tui.dashboard.reader import RunView, RunWatcher

SECTIONS = ("data", "model", "train", "maml_pp", "eval")


def number(value: Any) -> float | None:
    """`value` as a float when it is a real number (not a bool, not null)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def one_per_iteration(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Events by type, one per iteration, in iteration order: the last one written wins.

    An event at or before the last kept iteration of its type rewinds that type's series to it
    (a resumed run redoing iterations its killed predecessor already logged), as the dashboard's
    series do, so a half-redone stretch never keeps stale events after the new ones.
    """
    by_type: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        kind, it = event.get("type"), event.get("iteration")
        if not isinstance(kind, str) or not isinstance(it, int) or isinstance(it, bool):
            continue
        series = by_type.setdefault(kind, [])
        if series and it <= series[-1]["iteration"]:
            while series and series[-1]["iteration"] >= it:
                series.pop()
        series.append(event)
    return by_type


def flatten_config(config: dict[str, Any]) -> dict[str, Any]:
    """`{"section.key": value}` for the config keys that shape a run, plus `name` (the preset).

    The description, the recorded runtime and any tags a tool adds are left out: they describe
    the run, they do not change what it computes.
    """
    flat: dict[str, Any] = {}
    if "name" in config:
        flat["name"] = config["name"]
    for section in SECTIONS:
        values = config.get(section)
        if isinstance(values, dict):
            for key, value in values.items():
                flat[f"{section}.{key}"] = value
    return flat


def engine_config(config: dict[str, Any]):
    """The engine's `Config` for a run's config.json, or None when it no longer validates."""
    from engine.config import ConfigError, from_dict

    raw = {k: v for k, v in config.items() if k in ("name", "description", *SECTIONS)}
    try:
        return from_dict(raw)
    except ConfigError:
        return None


def preset_baseline(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(what the run is compared with, its flattened config): the preset it names, or the
    defaults when it names none (a `--config` file)."""
    from engine.config import Config, ConfigError, from_dict
    from engine.presets import load_preset_raw, preset_names

    name = config.get("name")
    if isinstance(name, str) and name in preset_names():
        try:
            return f"preset {name}", flatten_config(from_dict(load_preset_raw(name)).to_dict())
        except ConfigError:
            pass
    return "the defaults", flatten_config(Config().to_dict())


@dataclass
class RunData:
    """Everything a report draws about one run, read once."""

    run: RunDir
    config: dict[str, Any]
    status: dict[str, Any]
    view: RunView
    events: list[dict[str, Any]]
    series: dict[str, list[dict[str, Any]]]
    cfg: Any = None  # engine.config.Config, or None when config.json no longer validates
    notes: list[str] = field(default_factory=list)

    # -- identity and shape

    @property
    def run_id(self) -> str:
        return self.run.run_id

    @property
    def preset(self) -> str:
        return self.view.preset

    @property
    def state(self) -> str:
        return self.view.state

    def section(self, name: str) -> dict[str, Any]:
        value = self.config.get(name)
        return value if isinstance(value, dict) else {}

    @property
    def epochs(self) -> int:
        return int(self.section("train").get("epochs") or 0)

    @property
    def iters_per_epoch(self) -> int:
        return int(self.section("train").get("iters_per_epoch") or 0)

    @property
    def inner_steps(self) -> int:
        return self.view.inner_steps

    @property
    def ways(self) -> int:
        return int(self.section("data").get("ways") or 0)

    @property
    def top_k(self) -> int:
        return self.view.top_k

    # -- histories

    def train(self) -> list[dict[str, Any]]:
        return self.series.get("train", [])

    def validation(self) -> dict[int, dict[str, Any]]:
        """{epoch: {"accuracy", "ci95", "loss", "tasks"}} with a numeric accuracy."""
        return {e: v for e, v in self.view.val.items() if number(v.get("accuracy")) is not None}

    def lslr_history(self) -> list[tuple[float, dict[str, list[float]]]]:
        """(epochs completed, {tensor: [rate per step]}) for every `lslr` event."""
        ipe = self.iters_per_epoch or 1
        history = []
        for event in self.series.get("lslr", []):
            rates = event.get("rates")
            if not isinstance(rates, dict):
                continue
            clean = {str(k): [number(v) for v in vs] for k, vs in rates.items()
                     if isinstance(vs, list)}
            history.append((event["iteration"] / ipe, clean))
        return history

    def ensemble(self) -> dict[str, Any] | None:
        ens = self.view.ensemble
        if not ens or number(ens.get("accuracy")) is None or not ens.get("members"):
            return None
        return ens

    # -- the engine's schedules on this run's config

    def planned_msl(self) -> list[list[float]]:
        """MSL weights per epoch, per inner step, as `engine.msl` computes them."""
        from engine.msl import msl_weights

        if self.cfg is None:
            return []
        p = self.cfg.maml_pp
        return [msl_weights(e, self.cfg.train.inner_steps, p.msl_epochs, p.msl)
                for e in range(self.cfg.train.epochs)]

    def planned_meta_lr(self) -> list[float]:
        """The meta learning rate per epoch (`engine.schedule.meta_lr`)."""
        from engine.schedule import meta_lr

        if self.cfg is None:
            return []
        return [meta_lr(e, self.cfg) for e in range(self.cfg.train.epochs)]

    def first_order_epochs(self) -> list[int]:
        """Epochs trained with first-order meta-gradients (`engine.schedule.second_order_at`)."""
        from engine.schedule import second_order_at

        if self.cfg is None:
            return []
        return [e for e in range(self.cfg.train.epochs) if not second_order_at(e, self.cfg)]

    # -- header numbers

    def wall_time(self) -> float | None:
        """Seconds the engine ran, pauses and kills left out, as a study's table counts them
        (`engine.study_results.wall_and_speed`)."""
        from engine.study_results import wall_and_speed

        return wall_and_speed(self.run)[0]

    def iters_per_sec(self) -> float | None:
        """Median of the engine's training-speed reports (`wall_and_speed`)."""
        from engine.study_results import wall_and_speed

        return wall_and_speed(self.run)[1]

    def config_diff(self) -> tuple[str, list[tuple[str, Any, Any]]]:
        """(baseline label, [(key, baseline value, this run's value)]) for keys that differ."""
        label, base = preset_baseline(self.config)
        mine = flatten_config(self.config)
        keys = [k for k in mine if k != "name"] + [k for k in base if k not in mine]
        return label, [(k, base.get(k), mine.get(k)) for k in keys if base.get(k) != mine.get(k)]

    def runtime(self) -> dict[str, Any]:
        return self.section("runtime")


def load_run(run: RunDir | Path) -> RunData:
    """Read one run directory (any state) into a `RunData`."""
    run = run if isinstance(run, RunDir) else RunDir(Path(run))
    view = RunWatcher(run.path, local_sampling=False).poll()
    config = run.read_config()
    events, _ = read_events(run.events_path)
    return RunData(run=run, config=config, status=run.read_status(), view=view, events=events,
                   series=one_per_iteration(events), cfg=engine_config(config))
