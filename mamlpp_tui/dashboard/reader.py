"""The dashboard's data side: follows one run directory and folds it into a `RunView`.

Why it is separate from the widgets:

- All file and NVML I/O happens here, and `RunWatcher.poll` is only ever called from a worker
  thread, so the UI thread never waits on a slow disk, a remote mount or the GPU driver.
- It reads only the run directory (the DESIGN contract), so the same code shows a live run, a
  paused one, a finished one, a crashed one, or one started on another terminal.
- `events.jsonl` is followed by byte offset, and every history is bounded (decimated charts,
  capped log), so a run with 100k+ events costs the same per poll as a fresh one.
- A `RunView` is an immutable copy handed to the UI thread, so the worker can go on mutating its
  own state without locks.

Nothing here imports Textual or torch.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import Config, EvalConfig, from_dict
from engine.errors import UserError
from engine.events import read_events
from engine.run_store import RunDir, read_json
from engine.schedule import second_order_at
from engine.selection import top_k_epochs

MAX_POINTS = 2000  # kept points per chart series (the whole run, decimated)
LOG_LINES = 500  # log lines handed to the UI per poll at most (its RichLog keeps as many)
LOG_TAIL_BYTES = 64 * 1024  # how far back engine.log is read when the dashboard opens
SYSTEM_HISTORY = 240  # resource samples kept for the sparkline
LOCAL_SAMPLE_S = 1.5  # how often the engine process / GPU is sampled directly

# engine.log lines that repeat what the dashboard already derives from structured events
# (checkpoint, phase switch, MSL off, ensemble); without this filter each shows up twice.
_DUPLICATE_LOG_RE = re.compile(
    r"checkpoint \S+ saved|second-order meta-gradients from here on|multi-step loss off|"
    r"ensemble of epochs"
)
_LOG_LINE_RE = re.compile(
    r"^(\d{4}-\d\d-\d\d) (\d\d:\d\d:\d\d),(\d+) (DEBUG|INFO|WARNING|ERROR|CRITICAL) (.*)$"
)


# ---------------------------------------------------------------- bounded series


class Decimator:
    """At most `limit` evenly spaced points of an unbounded series, plus the latest point.

    Why: a long run writes 100k+ train events. Keeping every `stride`-th point and, when full,
    dropping every other kept point and doubling the stride keeps the shape of the whole run at
    a constant memory and drawing cost. After a resume the engine replays iterations it already
    logged; a point at or before the last kept iteration rewinds the series to it, so the newer
    copy wins (events.py: the last event per iteration is the true one).
    """

    def __init__(self, limit: int = MAX_POINTS) -> None:
        self.limit = max(2, limit)
        self.stride = 1
        self.points: list[tuple[int, Any]] = []
        self.last: tuple[int, Any] | None = None
        self._offered = 0

    def add(self, x: int, value: Any) -> None:
        """Offer one point; kept if it falls on the stride."""
        if self.last is not None and x <= self.last[0]:
            self.points = [p for p in self.points if p[0] < x]
            self._offered = len(self.points) * self.stride
        self.last = (x, value)
        if self._offered % self.stride == 0:
            self.points.append((x, value))
            if len(self.points) > self.limit:
                self.points = self.points[::2]
                self.stride *= 2
        self._offered += 1

    def snapshot(self) -> tuple[tuple[int, Any], ...]:
        """The kept points with the latest point always last (the chart must reach 'now')."""
        if self.last is not None and (not self.points or self.points[-1][0] != self.last[0]):
            return (*self.points, self.last)
        return tuple(self.points)

    def __len__(self) -> int:
        return len(self.points)


# ---------------------------------------------------------------- the view handed to the UI


@dataclass(frozen=True)
class LogLine:
    """One line for the log panel; `kind` picks its style (info, warning, error, event, ...)."""

    time: float
    text: str
    kind: str = "info"


@dataclass(frozen=True)
class RunView:
    """Everything the panels show, as of one poll. Immutable: built in the worker thread and
    read in the UI thread. `revisions` tells each panel whether its data changed, so unchanged
    panels are not redrawn."""

    run_id: str
    preset: str = "?"
    state: str = "unknown"
    error: str | None = None
    pid: int | None = None
    alive: bool = False
    device: str | None = None
    second_order: bool | None = None
    iteration: int = 0
    epoch: int = 0
    epochs: int = 0
    iters_per_epoch: int = 0
    total: int = 0
    iters_per_sec: float | None = None
    eta_s: float | None = None
    latest_checkpoint: str | None = None
    # per-step query losses: ((iteration, loss, (step losses...), accuracy), ...)
    loss_points: tuple[tuple[int, Any], ...] = ()
    latest_train: dict[str, Any] | None = None
    inner_steps: int = 0
    msl_enabled: bool = True
    msl_epochs: int = 0
    msl_weights: tuple[float, ...] = ()
    msl_by_epoch: dict[int, tuple[float, ...]] = field(default_factory=dict)
    lslr_epoch: int | None = None
    lslr_rates: dict[str, tuple[float, ...]] = field(default_factory=dict)
    val: dict[int, dict[str, Any]] = field(default_factory=dict)
    top_k: int = EvalConfig.ensemble_top_k
    top_epochs: tuple[int, ...] = ()  # engine.selection.top_k_epochs of `val`
    checkpoint_epochs: frozenset[int] = frozenset()
    ensemble: dict[str, Any] | None = None
    ensemble_mtime: float | None = None
    system: dict[str, Any] | None = None
    system_source: str = "events"
    system_history: tuple[float, ...] = ()
    new_log: tuple[LogLine, ...] = ()
    revisions: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------- live sampling


class LocalMonitor:
    """Samples the engine process (psutil) and its GPU (NVML) directly, when both are here.

    Why: `system` events arrive every few seconds and stop when the engine dies; when the
    engine runs on this machine a direct sample every ~1.5 s is fresher. Only used while the
    run's lock is held (read_status says running/paused), which means the engine is local.
    Any failure (no NVML, no permission, process gone) quietly falls back to the events.
    """

    def __init__(self) -> None:
        self._process: Any = None
        self._pid: int | None = None
        self._nvml_ok: bool | None = None
        self._handles: dict[int, Any] = {}
        self._last = 0.0
        self._sample: dict[str, Any] | None = None

    def sample(self, pid: int | None, device: str | None) -> dict[str, Any] | None:
        """A `system`-event-shaped dict for the engine process, or None when not possible."""
        if not pid:
            return None
        now = time.monotonic()
        if now - self._last < LOCAL_SAMPLE_S and self._pid == pid:
            return self._sample
        self._last = now
        sample = self._process_sample(pid)
        if sample is None:
            self._sample = None
            return None
        sample["device"] = device or "cpu"
        if device and device.startswith("cuda"):
            sample.update(self._gpu_sample(device))
        self._sample = sample
        return sample

    def _process_sample(self, pid: int) -> dict[str, Any] | None:
        try:
            import psutil

            if self._pid != pid or self._process is None:
                self._process = psutil.Process(pid)
                self._pid = pid
                self._process.cpu_percent(None)  # the first reading only primes the counter
                return None
            return {"cpu_percent": self._process.cpu_percent(None),
                    "rss": self._process.memory_info().rss,
                    "gpu_util": None, "gpu_mem_used": None, "gpu_mem_total": None}
        except Exception:
            self._process = None
            self._pid = None
            return None

    def _gpu_sample(self, device: str) -> dict[str, Any]:
        if self._nvml_ok is False:
            return {}
        try:
            import pynvml

            if self._nvml_ok is None:
                pynvml.nvmlInit()
                self._nvml_ok = True
            index = int(device.split(":", 1)[1]) if ":" in device else 0
            if index not in self._handles:
                self._handles[index] = pynvml.nvmlDeviceGetHandleByIndex(index)
            handle = self._handles[index]
            util = pynvml.nvmlDeviceGetUtilizationRates(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            return {"gpu_util": util.gpu, "gpu_mem_used": mem.used, "gpu_mem_total": mem.total}
        except Exception:
            self._nvml_ok = False
            return {}


# ---------------------------------------------------------------- the watcher


def _is_final_only(weights: list[float]) -> bool:
    return len(weights) > 1 and all(w == 0 for w in weights[:-1])


def _engine_config(config: dict[str, Any]) -> Config | None:
    """The engine's Config of a config.json (its `runtime` and other records dropped), so the
    engine's own rules read it; None when it does not validate."""
    sections = ("name", "description", "data", "model", "train", "maml_pp", "eval")
    try:
        return from_dict({k: v for k, v in config.items() if k in sections})
    except (UserError, TypeError, ValueError, AttributeError):
        return None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _clean_point(point: tuple[int, Any]) -> tuple[int, Any]:
    """(iteration, (loss, (step losses...), accuracy)) with anything not a number as None."""
    it, (loss, steps, acc) = point
    steps = steps if isinstance(steps, list) else []
    return it, (_number(loss), tuple(_number(v) for v in steps), _number(acc))


class RunWatcher:
    """Follows one run directory; `poll()` reads what changed and returns a fresh `RunView`.

    Not thread-safe: call `poll` from one thread at a time (the app runs it in a single
    worker and never starts a second while one is going).
    """

    def __init__(self, run_dir: Path, *, local_sampling: bool = True) -> None:
        self.run = RunDir(Path(run_dir))
        self.local = LocalMonitor() if local_sampling else None
        self._offset = 0
        self._log_offset: int | None = None
        self._log_partial = b""
        self._log_time = 0.0
        self._ens_log_offset: int | None = None
        self._config: dict[str, Any] = {}
        self._config_mtime: int | None = None
        self._engine_config: Config | None = None  # None: no config.json, or one that fails
        self._ckpt_mtime: int | None = None
        self._sidecars: dict[str, tuple[int, dict[str, Any]]] = {}
        self._latest_ckpt: str | None = None
        self._ensemble_file: dict[str, Any] | None = None
        self._ensemble_mtime: int | None = None
        self._ensemble_event: dict[str, Any] | None = None
        self._losses = Decimator()
        self._latest_train: dict[str, Any] | None = None
        self._msl_by_epoch: dict[int, tuple[float, ...]] = {}
        self._lslr: tuple[int, dict[str, tuple[float, ...]]] | None = None
        self._val: dict[int, dict[str, Any]] = {}
        self._system: dict[str, Any] | None = None
        self._system_history: deque[float] = deque(maxlen=SYSTEM_HISTORY)
        self._device_from_events: str | None = None
        self._prev_second_order: bool | None = None
        self._prev_final_only: bool | None = None
        self._last_state_logged: str | None = None
        self._last_error_logged: str | None = None
        self._revisions: dict[str, int] = {}
        self._pending_log: list[LogLine] = []
        self._last_live: dict[str, Any] | None = None
        self._prev_raw_weights: Any = None
        self._dirty_train = False
        self._loss_view: tuple[tuple[int, Any], ...] | None = None

    # -- public

    def poll(self) -> RunView:
        """Read everything that changed since the last call and return the whole picture."""
        self._read_config()
        status = self.run.read_status()
        self._read_events()
        self._read_checkpoints()
        self._read_ensemble()
        self._read_log()
        return self._view(status)

    # -- readers

    def _bump(self, *panels: str) -> None:
        for panel in panels:
            self._revisions[panel] = self._revisions.get(panel, 0) + 1

    def _read_config(self) -> None:
        try:
            mtime = self.run.config_path.stat().st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self._config_mtime:
            return
        try:
            config = read_json(self.run.config_path)
        except (OSError, ValueError):
            return  # being replaced right now; the next poll reads it
        if isinstance(config, dict):
            self._config, self._config_mtime = config, mtime
            self._engine_config = _engine_config(config)
            self._bump("header", "msl", "val")

    def _read_events(self) -> None:
        events, self._offset = read_events(self.run.events_path, self._offset)
        handlers = {"train": self._on_train, "lslr": self._on_lslr, "val": self._on_val,
                    "checkpoint": self._on_checkpoint, "ensemble": self._on_ensemble,
                    "system": self._on_system, "state": self._on_state}
        for event in events:
            handler = handlers.get(event.get("type"))
            if handler is not None:
                try:
                    handler(event)
                except (TypeError, ValueError, KeyError, AttributeError, IndexError):
                    continue  # a malformed event must not take the dashboard down
        if self._dirty_train:
            self._dirty_train = False
            self._loss_view = None
            self._bump("losses", "msl", "header")

    def _read_checkpoints(self) -> None:
        directory = self.run.checkpoints_dir
        try:
            mtime = directory.stat().st_mtime_ns
        except FileNotFoundError:
            return
        if mtime == self._ckpt_mtime:
            return
        self._ckpt_mtime = mtime
        seen: dict[str, tuple[int, dict[str, Any]]] = {}
        with contextlib.suppress(OSError):
            for path in directory.glob("*.json"):
                if path.name == "latest.json":
                    continue
                try:
                    m = path.stat().st_mtime_ns
                    cached = self._sidecars.get(path.stem)
                    meta = cached[1] if cached and cached[0] == m else read_json(path)
                except (OSError, ValueError):
                    continue
                if isinstance(meta, dict):
                    seen[path.stem] = (m, meta)
        self._sidecars = seen
        try:
            latest = read_json(directory / "latest.json")
            self._latest_ckpt = latest.get("name") if isinstance(latest, dict) else None
        except (OSError, ValueError):
            self._latest_ckpt = None
        # the newest sidecar's history fills validation epochs whose events are missing
        newest = max(seen.values(), key=lambda s: s[1].get("iteration") or 0, default=None)
        if newest is not None:
            for entry in newest[1].get("history") or []:
                if isinstance(entry, dict) and isinstance(entry.get("epoch"), int):
                    self._val.setdefault(entry["epoch"], dict(entry))
        self._bump("val", "header")

    def _read_ensemble(self) -> None:
        try:
            mtime = self.run.ensemble_path.stat().st_mtime_ns
        except FileNotFoundError:
            if self._ensemble_file is not None:
                self._ensemble_file, self._ensemble_mtime = None, None
                self._bump("val")
            return
        if mtime == self._ensemble_mtime:
            return
        result = self.run.read_ensemble()
        if isinstance(result, dict):
            self._ensemble_file, self._ensemble_mtime = result, mtime
            self._bump("val", "ensemble")

    def _read_log(self) -> None:
        for raw in self._tail(self.run.log_path, "_log_offset"):
            self._log_line(raw, prefix="")
        ensemble_log = self.run.path / "ensemble.log"
        lines = self._tail(ensemble_log, "_ens_log_offset")
        if lines:
            # the CLI's output has no timestamps; the file's mtime places it well enough
            engine_time = self._log_time
            with contextlib.suppress(OSError):
                self._log_time = ensemble_log.stat().st_mtime
            for raw in lines:  # `mamlpp ensemble --plain`: a sentence per member, then the
                # ensemble's, which the ensemble event already put in the log
                if not _DUPLICATE_LOG_RE.match(raw):
                    self._log_line(raw, prefix="" if raw.startswith("ensemble") else "ensemble: ")
            self._log_time = engine_time

    def _tail(self, path: Path, attr: str) -> list[str]:
        """New complete lines of a text file followed by offset (first call: the last 64 KiB)."""
        offset = getattr(self, attr)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                start = max(0, size - LOG_TAIL_BYTES) if offset is None else offset
                if size < start:
                    start = 0  # file was replaced
                f.seek(start)
                data = f.read(size - start)
        except OSError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            setattr(self, attr, start)
            return []
        setattr(self, attr, start + end + 1)
        lines = data[:end].decode("utf-8", "replace").split("\n")
        if offset is None and start > 0:
            lines = lines[1:]  # the first line was cut by the 64 KiB window
        return lines

    def _log_line(self, raw: str, prefix: str) -> None:
        raw = raw.rstrip()
        if not raw:
            return
        m = _LOG_LINE_RE.match(raw)
        if m:
            date, clock, millis, level, message = m.groups()
            with contextlib.suppress(ValueError, OverflowError):
                stamp = time.strptime(f"{date} {clock}", "%Y-%m-%d %H:%M:%S")
                self._log_time = time.mktime(stamp) + int(millis) / 1000
            if level == "INFO" and _DUPLICATE_LOG_RE.search(message):
                return
            kind = {"WARNING": "warning", "ERROR": "error", "CRITICAL": "error"}.get(level, "info")
            self._log(self._log_time, f"{prefix}{message}", kind)
        else:  # a traceback or a print() from the engine process
            kind = "error" if raw.startswith(("Traceback", "  ", "error:")) or "Error" in raw \
                else "plain"
            self._log(self._log_time, f"{prefix}{raw}", kind)

    def _log(self, when: float, text: str, kind: str) -> None:
        self._pending_log.append(LogLine(when, text, kind))

    # -- event handlers (one per event type)

    def _on_train(self, e: dict[str, Any]) -> None:
        # the hot path (one call per train event, 100k+ on a first poll): store the raw
        # fields; they are checked when a view is built, for the <= MAX_POINTS kept points only
        it = int(e["iteration"])
        self._losses.add(it, (e.get("loss"), e.get("step_losses"), e.get("accuracy")))
        self._latest_train = e
        raw_weights = e.get("msl_weights")
        epoch = e.get("epoch", 0)
        if raw_weights and (raw_weights != self._prev_raw_weights
                            or epoch not in self._msl_by_epoch):
            self._prev_raw_weights = raw_weights
            weights = [float(w) for w in raw_weights if _number(w) is not None]
            if weights:
                self._msl_by_epoch[int(epoch)] = tuple(weights)
                final_only = _is_final_only(weights)
                if final_only and self._prev_final_only is False:
                    self._log(e.get("time", 0.0), f"MSL off: only the final step's loss counts "
                              f"from epoch {epoch}", "event")
                self._prev_final_only = final_only
        second = e.get("second_order")
        if second is not self._prev_second_order and isinstance(second, bool):
            if self._prev_second_order is not None:
                order = "second" if second else "first"
                self._log(e.get("time", 0.0), f"phase: {order}-order meta-gradients from "
                          f"epoch {epoch}", "event")
            self._prev_second_order = second
        self._dirty_train = True

    def _on_lslr(self, e: dict[str, Any]) -> None:
        rates = e.get("rates") or {}
        self._lslr = (int(e.get("epoch", 0)),
                      {str(k): tuple(_number(v) or 0.0 for v in vs) for k, vs in rates.items()})
        self._bump("lslr")

    def _on_val(self, e: dict[str, Any]) -> None:
        self._val[int(e["epoch"])] = {k: e.get(k) for k in ("accuracy", "ci95", "loss", "tasks")}
        self._bump("val")

    def _on_checkpoint(self, e: dict[str, Any]) -> None:
        name = Path(str(e.get("path", "?"))).name.removesuffix(".safetensors")
        acc = _number(e.get("val_accuracy"))
        text = f"checkpoint {name} saved ({e.get('reason', 'saved')})"
        if acc is not None:
            text += f", val {100 * acc:.2f}%"
        self._log(e.get("time", 0.0), text, "event")

    def _on_ensemble(self, e: dict[str, Any]) -> None:
        self._ensemble_event = e
        acc, ci = _number(e.get("accuracy")), _number(e.get("ci95"))
        members = ", ".join(str(m) for m in e.get("members") or [])
        if acc is not None:
            self._log(e.get("time", 0.0), f"ensemble of epochs {members}: test "
                      f"{100 * acc:.2f}% ± {100 * (ci or 0):.2f}", "good")
        self._bump("val", "ensemble")

    def _on_system(self, e: dict[str, Any]) -> None:
        self._system = e
        if e.get("device"):
            self._device_from_events = str(e["device"])
        self._push_system(e)
        self._bump("system", "header")

    def _on_state(self, e: dict[str, Any]) -> None:
        state = str(e.get("state"))
        reason = e.get("reason")
        kind = {"failed": "error", "finished": "good", "paused": "warning",
                "stopped": "warning"}.get(state, "event")
        self._log(e.get("time", 0.0), f"state → {state}" + (f" ({reason})" if reason else ""),
                  kind)
        self._last_state_logged = state
        if state == "failed" and reason:
            self._last_error_logged = str(reason)
        self._bump("header")

    def _push_system(self, sample: dict[str, Any]) -> None:
        value = _number(sample.get("gpu_util"))
        if value is None:
            value = _number(sample.get("cpu_percent"))
        if value is not None:
            self._system_history.append(value)

    # -- the view

    def _loss_points(self) -> tuple[tuple[int, Any], ...]:
        if self._loss_view is None:
            self._loss_view = tuple(_clean_point(p) for p in self._losses.snapshot())
        return self._loss_view

    def _view(self, status: dict[str, Any]) -> RunView:
        cfg = self._config
        train = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
        mpp = cfg.get("maml_pp") if isinstance(cfg.get("maml_pp"), dict) else {}
        runtime = cfg.get("runtime") if isinstance(cfg.get("runtime"), dict) else {}
        epochs = int(train.get("epochs") or 0)
        ipe = int(train.get("iters_per_epoch") or 0)
        total = epochs * ipe
        latest = self._latest_train or {}
        state = str(status.get("state") or "unknown")
        error = status.get("error")
        if state == "failed" and error and error != self._last_error_logged:
            # stamped with the status file's own time, so a crashed run's view is reproducible
            when = _number(status.get("updated")) or self._log_time
            self._log(when, f"error: {error}", "error")
            self._last_error_logged = str(error)
            self._bump("header")
        iteration = status.get("iteration")
        if not isinstance(iteration, int):
            iteration = int(latest.get("iteration") or 0)
        epoch = status.get("epoch")
        if not isinstance(epoch, int):
            epoch = int(latest.get("epoch") or 0)
        speed = _number(latest.get("iters_per_sec"))
        speed = speed if speed else None
        eta = (total - iteration) / speed if speed and state == "running" and total else None
        second = latest.get("second_order")
        engine_cfg = self._engine_config
        if not isinstance(second, bool):  # no train event yet: the engine's schedule says
            second = second_order_at(epoch, engine_cfg) if engine_cfg else None
        device = runtime.get("device") or self._device_from_events

        system, source = self._system, "events"
        alive = state in ("running", "paused")
        if alive and self.local is not None:
            sample = self.local.sample(status.get("pid"), device)
            if sample is not None:
                system, source = sample, "live"
                if sample is not self._last_live:  # a fresh sample, not the cached one
                    self._last_live = sample
                    self._push_system(sample)
                    self._bump("system")

        top_k = engine_cfg.eval.ensemble_top_k if engine_cfg else EvalConfig.ensemble_top_k
        top = tuple(top_k_epochs([{**v, "epoch": e} for e, v in self._val.items()], top_k))
        ckpt_epochs = frozenset(
            int(meta["epoch"]) for name, (_, meta) in self._sidecars.items()
            if name.startswith("epoch-") and isinstance(meta.get("epoch"), int))
        ensemble = self._ensemble_file or self._ensemble_event

        lslr_epoch, lslr_rates = self._lslr if self._lslr else (None, {})
        weights = tuple(float(w) for w in latest.get("msl_weights") or [])
        inner = int(train.get("inner_steps") or len(weights) or 0)

        log = tuple(sorted(self._pending_log, key=lambda line: line.time)[-LOG_LINES:])
        self._pending_log = []
        if log:
            self._bump("log")
        return RunView(
            run_id=self.run.run_id,
            preset=str(cfg.get("name") or "?"),
            state=state,
            error=str(error) if error else None,
            pid=status.get("pid") if isinstance(status.get("pid"), int) else None,
            alive=alive,
            device=str(device) if device else None,
            second_order=second,
            iteration=iteration,
            epoch=epoch,
            epochs=epochs,
            iters_per_epoch=ipe,
            total=total,
            iters_per_sec=speed,
            eta_s=eta,
            latest_checkpoint=self._latest_ckpt,
            loss_points=self._loss_points(),
            latest_train=dict(latest) if latest else None,
            inner_steps=inner,
            msl_enabled=bool(mpp.get("msl", True)),
            msl_epochs=int(mpp.get("msl_epochs") or 0),
            msl_weights=weights,
            msl_by_epoch=dict(self._msl_by_epoch),
            lslr_epoch=lslr_epoch,
            lslr_rates=dict(lslr_rates),
            val={e: dict(v) for e, v in sorted(self._val.items())},
            top_k=top_k,
            top_epochs=top,
            checkpoint_epochs=ckpt_epochs,
            ensemble=dict(ensemble) if ensemble else None,
            ensemble_mtime=self._ensemble_mtime / 1e9 if self._ensemble_mtime else None,
            system=dict(system) if system else None,
            system_source=source,
            system_history=tuple(self._system_history),
            new_log=log,
            revisions=dict(self._revisions),
        )
