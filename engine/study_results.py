"""A study's result table, read from its members' run directories only (torch-free).

Per member: the ensemble test accuracy and its 95% CI (`ensemble.json`, SPEC section 4), the
best single-epoch test accuracy (the best of the ensemble members' own test accuracies, i.e. of
the top-k validation epochs each evaluated alone), the best validation accuracy (the newest
checkpoint's validation history), the wall time the engine spent on it (the `running` periods
in events.jsonl, kills and pauses left out) and its training speed (the median of the engine's
own iterations/s, validation excluded).

Per row (variant or grid point): the mean and the sample standard deviation (n - 1; None below
two) over the members that finished, and each finished seed's 95% CI, as the paper reports them.
"""

from __future__ import annotations

import contextlib
import statistics
from typing import Any

from engine.events import read_events
from engine.run_store import RunDir, read_json
from engine.studies import MemberRun, Study

_EVENTS: dict[str, tuple[tuple[int, int], tuple[float | None, float | None]]] = {}


def val_history(run: RunDir) -> list[dict[str, Any]]:
    """The validation history in the newest readable checkpoint sidecar."""
    best: tuple[int, list[dict[str, Any]]] | None = None
    with contextlib.suppress(FileNotFoundError):
        for entry in run.checkpoints_dir.iterdir():
            if not entry.name.endswith(".json") or entry.name == "latest.json":
                continue
            try:
                meta = read_json(entry)
                iteration, history = int(meta["iteration"]), list(meta.get("history") or [])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if best is None or iteration > best[0]:
                best = (iteration, history)
    return best[1] if best else []


def wall_and_speed(run: RunDir) -> tuple[float | None, float | None]:
    """(seconds the engine ran, median training iterations/s) from events.jsonl; cached by the
    file's size and mtime."""
    path = run.events_path
    try:
        st = path.stat()
    except FileNotFoundError:
        return None, None
    key = (st.st_size, st.st_mtime_ns)
    cached = _EVENTS.get(str(path))
    if cached and cached[0] == key:
        return cached[1]
    events, _ = read_events(path)
    total, opened, last = 0.0, None, None
    speeds = []
    for e in events:
        t = e.get("time")
        if not isinstance(t, (int, float)):
            continue
        if e.get("type") == "state":
            if e.get("state") == "running":
                if opened is not None and last is not None:  # the previous engine died
                    total += last - opened
                opened = t
            elif opened is not None:
                total += t - opened
                opened = None
        elif e.get("type") == "train" and (e.get("iters_per_sec") or 0) > 0:
            speeds.append(float(e["iters_per_sec"]))
        last = t
    if opened is not None and last is not None:
        total += last - opened
    result = (total if events else None, statistics.median(speeds) if speeds else None)
    _EVENTS[str(path)] = (key, result)
    return result


def member_result(mr: MemberRun) -> dict[str, Any]:
    """One member's line of the table (the DESIGN.md member fields plus the rest)."""
    out: dict[str, Any] = {"run": mr.run.run_id if mr.run else None, "seed": mr.member.seed,
                           "state": mr.state, "iteration": 0, "total_iterations": _total(mr),
                           "test_accuracy": None, "ci95": None, "best_epoch_test_accuracy": None,
                           "best_val_accuracy": None, "wall_s": None, "iters_per_sec": None}
    if mr.deleted:
        out["run"] = mr.deleted
    if mr.duplicates:
        out["duplicates"] = mr.duplicates
    if mr.run is None:
        return out
    out["iteration"] = mr.status.get("iteration") or 0
    ensemble = mr.run.read_ensemble()
    if isinstance(ensemble, dict) and isinstance(ensemble.get("accuracy"), (int, float)):
        out["test_accuracy"] = ensemble["accuracy"]
        out["ci95"] = ensemble.get("ci95")
        members = [a for a in ensemble.get("member_accuracies") or [] if a is not None]
        out["best_epoch_test_accuracy"] = max(members) if members else None
    history = [h["accuracy"] for h in val_history(mr.run)
               if isinstance(h.get("accuracy"), (int, float))]
    out["best_val_accuracy"] = max(history) if history else None
    out["wall_s"], out["iters_per_sec"] = wall_and_speed(mr.run)
    return out


def _total(mr: MemberRun) -> int:
    t = mr.member.config["train"]
    return t["epochs"] * t["iters_per_epoch"]


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None where undefined)."""
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def study_table(study: Study, members: list[MemberRun]) -> dict[str, Any]:
    """`mamlpp study show --json`: {"study", "rows": [{"variant", "overrides", "finished",
    "test_accuracy_mean", "test_accuracy_std", "members": [...], ...}], ...}."""
    by_variant: dict[str, list[dict[str, Any]]] = {v["name"]: [] for v in study.variants}
    for mr in members:
        by_variant[mr.member.variant].append(member_result(mr))
    rows = []
    for variant in study.variants:
        results = by_variant[variant["name"]]
        done = [r for r in results if r["state"] == "finished" and r["test_accuracy"] is not None]
        test_mean, test_std = mean_std([r["test_accuracy"] for r in done])
        best_mean, best_std = mean_std([r["best_epoch_test_accuracy"] for r in done
                                        if r["best_epoch_test_accuracy"] is not None])
        val_mean, val_std = mean_std([r["best_val_accuracy"] for r in done
                                      if r["best_val_accuracy"] is not None])
        wall = [r["wall_s"] for r in done if r["wall_s"] is not None]
        speed = [r["iters_per_sec"] for r in done if r["iters_per_sec"] is not None]
        states: dict[str, int] = {}
        for r in results:
            if r["state"] != "finished":
                states[r["state"]] = states.get(r["state"], 0) + 1
        rows.append({
            "variant": variant["name"], "overrides": variant["overrides"],
            "note": variant.get("note", ""), "seeds": len(results), "finished": len(done),
            "unfinished": states,
            "test_accuracy_mean": test_mean, "test_accuracy_std": test_std,
            "best_epoch_test_accuracy_mean": best_mean, "best_epoch_test_accuracy_std": best_std,
            "best_val_accuracy_mean": val_mean, "best_val_accuracy_std": val_std,
            "ci95": [r["ci95"] for r in done],
            "wall_s_mean": statistics.fmean(wall) if wall else None,
            "iters_per_sec_mean": statistics.fmean(speed) if speed else None,
            "members": results,
        })
    total = len(members)
    finished = sum(1 for mr in members if mr.finished)
    return {"study": study.id, "kind": study.kind, "base": study.base_name,
            "seeds": study.seeds, "state": study_state(study, members),
            "finished": finished, "members_total": total, "rows": rows}


def study_state(study: Study, members: list[MemberRun]) -> str:
    """running (a study process holds it), finished, not started or incomplete."""
    if study.is_running():
        return "running"
    if members and all(mr.finished for mr in members):
        return "finished"
    if all(mr.run is None for mr in members):
        return "not started"
    return "incomplete"
