"""Measure the six paper presets on this machine's CPU and write benchmarks/results/cpu-DATE.json.

    .venv/bin/python benchmarks/run_cpu.py                 # everything (about 30-60 min, 2 cores)
    .venv/bin/python benchmarks/run_cpu.py --preset omniglot-5w1s --iters 3 --no-thread-sweep

Every (preset, implementation, phase) runs in a fresh process (see engine/bench.py); the
targets are judged by benchmarks/acceptance.py. Besides the
default run (torch's default thread count), a thread sweep repeats the loop implementation of
omniglot-5w1s with one intra-op thread, because on a shared 2-core machine two threads can be
slower than one (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from benchmarks.acceptance import (  # noqa: E402
    add_targets,
    check_targets,
    format_rows,
    target_lines,
)
from engine.bench import (  # noqa: E402
    GIB,
    PAPER_PRESETS,
    BenchOptions,
    parse_impls,
    run_bench,
    summary_rows,
    write_report,
)


def merge(base: dict, new: dict) -> dict:
    """`base` with `new`'s (preset, impl) phases and alternating `paired` measurements in place
    of its own (a rerun of validation only keeps the training phases), rows and targets
    redone."""
    old = {(r["preset"], r["impl"]): r for r in base["results"]}
    fresh = {(r["preset"], r["impl"]): r for r in new["results"]}
    for key, r in fresh.items():
        r["rerun_created"] = new["created"]
        if key in old:
            r["train"] = {**old[key]["train"], **r["train"]}
            r["eval"] = r["eval"] if r.get("eval") is not None else old[key].get("eval")
    kept = [r for r in base["results"] if (r["preset"], r["impl"]) not in fresh]
    order = {(r["preset"], r["impl"]): i for i, r in enumerate(base["results"])}
    base["results"] = sorted(kept + list(fresh.values()),
                             key=lambda r: order.get((r["preset"], r["impl"]), len(order)))
    base.setdefault("reruns", []).append({
        "created": new["created"], "duration_s": new["duration_s"],
        "presets": sorted({p for p, _ in fresh} | set(new.get("paired", {}))),
        "impls": sorted({i for _, i in fresh}), "paired": sorted(new.get("paired", {})),
        "load_average_start": new["load_average_start"],
        "load_average_end": new["load_average_end"], "options": new["options"]})
    if "thread_sweep" in new:
        base["thread_sweep"] = new["thread_sweep"]
    for preset, orders in new.get("paired", {}).items():
        base.setdefault("paired", {}).setdefault(preset, {}).update(orders)
    base["rows"] = summary_rows(base)
    base["targets"] = check_targets(base)
    return base


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", action="append", help="preset (repeat); default: the six")
    ap.add_argument("--impl", default="all",
                    help="auto, plain, loop, vmap (comma-separated), both or all")
    ap.add_argument("--order", choices=("first", "second", "both", "none"), default="both",
                    help="none: validation only")
    ap.add_argument("--iters", type=int, default=None,
                    help="timed iterations per phase (default 3 for mini-ImageNet, 5 otherwise)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--eval-tasks", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-thread-sweep", action="store_true")
    ap.add_argument("--paired-rounds", type=int, default=3,
                    help="rounds of auto and plain alternating in one process (with both)")
    ap.add_argument("--paired-only", action="store_true",
                    help="only the alternating auto-vs-plain comparison")
    ap.add_argument("--job-timeout", type=float, default=1800.0, help="seconds per phase")
    ap.add_argument("--memory-cap-gib", type=float, default=None,
                    help="per-process allocation cap (default: 14 or 80%% of free RAM)")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: benchmarks/results/cpu-DATE.json")
    ap.add_argument("--merge-into", type=Path, default=None, metavar="REPORT",
                    help="replace REPORT's results for the presets measured now (e.g. ones a "
                         "load burst spoiled) and write it back; the rerun is listed in `reruns`")
    args = ap.parse_args(argv)

    def both(value: str, pair: tuple[str, str]) -> list[str]:
        return list(pair) if value == "both" else [value]

    free = psutil.virtual_memory().available
    cap = int(args.memory_cap_gib * GIB) if args.memory_cap_gib else min(14 * GIB, int(0.8 * free))
    options = BenchOptions(
        presets=args.preset or list(PAPER_PRESETS), impls=parse_impls(args.impl),
        orders=[] if args.order == "none" else both(args.order, ("first", "second")),
        device="cpu", iters=args.iters, warmup=args.warmup, eval_tasks=args.eval_tasks,
        threads=args.threads, paired_rounds=args.paired_rounds, paired_only=args.paired_only,
        job_timeout=args.job_timeout, memory_cap_bytes=cap)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    report = add_targets(run_bench(options, progress=say))
    if not args.no_thread_sweep:
        say("thread sweep: omniglot-5w1s, loop, 1 intra-op thread")
        sweep = run_bench(BenchOptions(presets=["omniglot-5w1s"], impls=["loop"], device="cpu",
                                       iters=args.iters, warmup=args.warmup,
                                       eval_tasks=args.eval_tasks, threads=1,
                                       job_timeout=args.job_timeout, memory_cap_bytes=cap),
                          progress=say)
        report["thread_sweep"] = {"threads": 1, "results": sweep["results"],
                                  "rows": sweep["rows"],
                                  "load_average_end": sweep["load_average_end"]}
    if args.merge_into:
        report = merge(json.loads(args.merge_into.read_text()), report)
    out = args.out or args.merge_into or (
        ROOT / "benchmarks" / "results" / f"cpu-{dt.date.today().isoformat()}.json")
    write_report(report, out)
    print(format_rows(report))
    if "thread_sweep" in report:
        print("\nthread sweep (1 intra-op thread):")
        print(format_rows(report["thread_sweep"]))
    for line in target_lines(report):
        print(line)
    print(f"load average {report['load_average_start']} -> {report['load_average_end']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
