"""README's speed table and benchmarks/README's roofline, from the JSON results.

    python benchmarks/speed_table.py [--date 2026-12-02,2026-12-01] [--prefer split,fused]

Reads, per paper preset, results/vs-reference-PRESET-DATE.json (mamlpp's default path and the
paper authors' code, second order with every step's loss, and validation, alternated round by
round) and the results/whole-run-*DATE.json files (`mamlpp bench --whole-run`: mamlpp's
first-order step and its whole schedule). The reference code's whole run is the same estimate
(engine.whole_run.estimate) on its schedule, second order throughout, with its measured
every-step-loss step for every iteration: an upper bound, since after the MSL epochs it
computes the last step's loss alone. Prints both tables as Markdown. With several dates each
preset takes its figures from the first date that has them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.vs_reference import speedup  # noqa: E402
from engine.config import resolve  # noqa: E402
from engine.whole_run import estimate, reference_schedule  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PRESETS = ["omniglot-5w1s", "omniglot-5w5s", "omniglot-20w1s", "omniglot-20w5s",
           "miniimagenet-5w1s", "miniimagenet-5w5s"]


def _median(rounds: list[dict], side: str, key: str) -> float | None:
    values = [r[side][key] for r in rounds if r[side].get(key) is not None]
    return statistics.median(values) if values else None


def _whole_runs(dates: tuple[str, ...]) -> dict[str, dict]:
    runs = {}
    for path in _in_override_order(dates, "whole-run-*{}.json"):
        for run in json.loads(path.read_text())["runs"]:
            if not run.get("overrides"):
                runs[run["preset"]] = run
    return runs


def _in_override_order(dates: tuple[str, ...], pattern: str) -> list[Path]:
    """Result files of the dates, read in this order a later one overrides an earlier one:
    the first date last, a date's files in name order."""
    return [p for date in reversed(dates) for p in sorted(RESULTS.glob(pattern.format(date)))]


def _bench_flops(dates: tuple[str, ...]) -> dict[str, tuple[float, float | None]]:
    """FLOPs of a second-order step and the matmul yardstick from `mamlpp bench` reports."""
    out = {}
    for path in _in_override_order(dates, "cpu-*{}.json"):
        for row in json.loads(path.read_text()).get("results", []):
            second = row.get("train", {}).get("second") or {}
            if second.get("flops_per_iter"):
                out[row["preset"]] = (second["flops_per_iter"], second.get("matmul_flops_per_s"))
    return out


def _step_flops(dates: tuple[str, ...], preset: str) -> float | None:
    """A second-order step's arithmetic as direct convolutions: the largest count any of the
    dates' vs-reference files of the preset recorded. Those measured before engine/bench.py
    counted with NNPACK's convolutions off (train.fft_conv) miss their FLOPs (torch's counter
    has no formula for them); every other file counts the same arithmetic."""
    counts = [r["mamlpp"]["flops_per_iter"]
              for date in dates
              for path in RESULTS.glob(f"vs-reference-{preset}-{date}*.json")
              for r in json.loads(path.read_text())["rounds"]
              if r["mamlpp"].get("flops_per_iter")]
    return max(counts, default=None)


def _reference_hours(preset: str, s_per_iter: float, s_per_task: float) -> float:
    cfg = reference_schedule(resolve(preset))
    every = {(True, True): s_per_iter, (True, False): s_per_iter}
    return estimate(cfg, every, s_per_task)["total_hours"]


def rows(dates: tuple[str, ...], prefer: tuple[str, ...] = (),
         pool_second: tuple[str, ...] = ()) -> list[dict]:
    """`dates`: the first that has a preset's result gives it. `prefer`: suffixes of later
    measurements of a date (results/vs-reference-PRESET-DATE-SUFFIX.json), the first a preset
    has taken over the date's plain file. `pool_second`: suffixes of that date's files whose
    second-order rounds ran the same second-order path: the second-order figures (s/iter, the
    speed-up, peak memory) are medians over their rounds too; validation is the file's own."""
    whole = _whole_runs(dates)
    bench_flops = _bench_flops(dates)
    out = []
    for preset in PRESETS:
        candidates = [(date, RESULTS / f"vs-reference-{preset}-{date}{s}.json")
                      for date in dates for s in (*(f"-{s}" for s in prefer), "")]
        date, path = next(((d, p) for d, p in candidates if p.exists()), (None, None))
        if path is None or preset not in whole:
            continue
        rounds = json.loads(path.read_text())["rounds"]
        pooled = [RESULTS / f"vs-reference-{preset}-{date}-{s}.json" for s in pool_second]
        second = rounds + [r for p in pooled if p.exists() and p != path
                           for r in json.loads(p.read_text())["rounds"]]
        run = whole[preset]
        first = next(p["s_per_iter"] for p in run["phases"]
                     if not p["second_order"] and p["every_step_loss"])
        ref_iter = _median(second, "reference", "s_per_iter")
        ref_task = _median(rounds, "reference", "s_per_task")
        out.append({
            "preset": preset,
            "file": path.name,
            "second_rounds": len(second),
            "first": first,
            "second": _median(second, "mamlpp", "s_per_iter"),
            "ref_second": ref_iter,
            "speedup_second": speedup(second, "s_per_iter"),
            "val": _median(rounds, "mamlpp", "s_per_task"),
            "ref_val": ref_task,
            "speedup_val": speedup(rounds, "s_per_task"),
            "rss": _median(second, "mamlpp", "train_peak_rss_gib"),
            "ref_rss": _median(second, "reference", "train_peak_rss_gib"),
            "hours": run["schedule"]["total_hours"],
            "ref_hours": _reference_hours(preset, ref_iter, ref_task),
            "flops": _step_flops(dates, preset),
            "matmul": _median(rounds, "mamlpp", "matmul_flops_per_s"),
        })
        if out[-1]["flops"] is None and preset in bench_flops:
            out[-1]["flops"], out[-1]["matmul"] = bench_flops[preset]
    return out


def _n(x: float) -> str:
    return f"{x:.3f}" if x < 0.1 else f"{x:.2f}" if x < 10 else f"{x:.1f}"


def speed_table(table: list[dict]) -> str:
    lines = ["| preset | s / meta-iteration, 1st / 2nd order | validation s / task | "
             "peak RSS, 2nd order | whole run |",
             "| --- | --- | --- | --- | --- |"]
    for r in table:
        lines.append(
            f"| {r['preset']} | {_n(r['first'])} / {_n(r['second'])} (reference "
            f"{_n(r['ref_second'])}: {r['speedup_second']:.2f}x) | {_n(r['val'])} (reference "
            f"{_n(r['ref_val'])}: {r['speedup_val']:.2f}x) | {r['rss']:.2f} GiB (reference "
            f"{r['ref_rss']:.2f}) | {r['hours']:.0f} h (reference {r['ref_hours']:.0f} h) |")
    return "\n".join(lines)


def roofline(table: list[dict]) -> str:
    lines = ["| preset | GFLOP / step | mamlpp GFLOP/s | reference GFLOP/s | needed for 2x | "
             "matmul yardstick |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in table:
        if not r["flops"]:
            continue
        g = r["flops"] / 1e9
        lines.append(
            f"| {r['preset']} | {g:.1f} | {g / r['second']:.1f} | {g / r['ref_second']:.1f} | "
            f"{2 * g / r['ref_second']:.1f} | "
            + (f"{r['matmul'] / 1e9:.0f} |" if r["matmul"] else "- |"))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--date", default="2026-12-01", metavar="DATE[,DATE...]",
                        help="the results' dates; with several, each preset's figures come "
                             "from the first date that has them")
    parser.add_argument("--prefer", default="", metavar="SUFFIX[,SUFFIX...]",
                        help="use vs-reference-PRESET-DATE-SUFFIX.json where it exists, the "
                             "first suffix first")
    parser.add_argument("--pool-second", default="", metavar="SUFFIX[,SUFFIX...]",
                        help="also take the second-order rounds of the chosen file's date's "
                             "vs-reference-PRESET-DATE-SUFFIX.json (the same second-order path)")
    args = parser.parse_args()
    table = rows(tuple(d for d in args.date.split(",") if d),
                 tuple(s for s in args.prefer.split(",") if s),
                 tuple(s for s in args.pool_second.split(",") if s))
    if not table:
        print(f"error: no vs-reference and whole-run results for {args.date} in {RESULTS}.",
              file=sys.stderr)
        return 2
    print(speed_table(table))
    print()
    print(roofline(table))
    print()
    print("from " + ", ".join(f"{r['file']} ({r['second_rounds']} second-order rounds)"
                              for r in table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
