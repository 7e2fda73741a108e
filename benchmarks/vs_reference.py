"""mamlpp's default path against the paper authors' code on this machine, alternating.

This machine's speed drifts by tens of percent between minutes, so figures measured an hour
apart do not compare. Each round runs, in fresh processes one after another: the reference
code's training step (second order, every step's loss: its epoch 0) and its validation
(benchmarks/reference_harness.py children), then `mamlpp bench` of the same preset (default
path, second order in the MSL phase, and validation). The ratio per round cancels the drift;
the report gives each round and the median ratio.

    MAMLPP_REFERENCE_DIR=/path/to/reference-files \\
        python benchmarks/vs_reference.py --preset omniglot-5w1s --rounds 3

The reference files: see benchmarks/reference_harness.py (SOURCES). Writes
results/vs-reference-PRESET-DATE.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.alternating import child_json  # noqa: E402

HARNESS = ROOT / "benchmarks" / "reference_harness.py"
# the harness's preset names
REFERENCE_NAME = {"omniglot-5w1s": "omniglot-5w1s", "omniglot-5w5s": "omniglot-5w5s",
                  "omniglot-20w1s": "omniglot-20w1s", "omniglot-20w5s": "omniglot-20w5s",
                  "miniimagenet-5w1s": "mini-imagenet-5w1s",
                  "miniimagenet-5w5s": "mini-imagenet-5w5s"}


def _reference(preset: str, phase: str, iters: int, tasks: int) -> dict:
    return child_json([sys.executable, str(HARNESS), "--child", "--preset",
                       REFERENCE_NAME[preset], "--phase", phase, "--iters", str(iters),
                       "--val-tasks", str(tasks)], os.environ["MAMLPP_REFERENCE_DIR"])


def _mamlpp(preset: str, iters: int, tasks: int) -> dict:
    with tempfile.TemporaryDirectory() as home:
        proc = subprocess.run(
            [sys.executable, "-m", "mamlpp_tui", "bench", "--preset", preset, "--impl", "auto",
             "--order", "second", "--iters", str(iters), "--eval-tasks", str(tasks), "--json"],
            check=True, capture_output=True, text=True, cwd=ROOT,
            env=dict(os.environ, MAMLPP_HOME=home, PYTHONPATH=str(ROOT)))
    row = json.loads(proc.stdout)["results"][0]
    return {"s_per_iter": row["train"]["second"]["s_per_iter"],
            "s_per_task": row["eval"]["s_per_task"],
            "train_peak_rss_gib": row["train"]["second"].get("process_peak_rss_bytes", 0) / 2**30,
            # the roofline's inputs: FLOPs of one step, and the matmul yardstick of the same run
            "flops_per_iter": row["train"]["second"].get("flops_per_iter"),
            "matmul_flops_per_s": row["train"]["second"].get("matmul_flops_per_s")}


def speedup(rounds: list[dict], key: str) -> float:
    """The median over rounds of the reference's figure over mamlpp's: > 1 when mamlpp is
    faster (each round's two sides ran minutes apart, so their ratio cancels the drift)."""
    return statistics.median(r["reference"][key] / r["mamlpp"][key] for r in rounds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(REFERENCE_NAME), default="omniglot-5w1s")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if "MAMLPP_REFERENCE_DIR" not in os.environ:
        print("error: set MAMLPP_REFERENCE_DIR to the folder of the reference code's files "
              "(benchmarks/reference_harness.py lists them).", file=sys.stderr)
        return 2
    rounds = []
    for r in range(args.rounds):
        ref_train = _reference(args.preset, "train", args.iters, 1)
        ref_val = _reference(args.preset, "val", 1, args.tasks)
        ours = _mamlpp(args.preset, args.iters, args.tasks)
        rounds.append({
            "reference": {"s_per_iter": ref_train["s_per_iter_median"],
                          "s_per_task": ref_val["s_per_task"],
                          "train_peak_rss_gib": ref_train["peak_rss_gib"]},
            "mamlpp": ours, "load_average": list(os.getloadavg()),
        })
        print(f"round {r + 1}: second order {ref_train['s_per_iter_median']:.3f} vs "
              f"{ours['s_per_iter']:.3f} s/iter, validation {ref_val['s_per_task']:.4f} vs "
              f"{ours['s_per_task']:.4f} s/task", file=sys.stderr, flush=True)

    from engine.bench import device_info

    ref_dir = Path(os.environ["MAMLPP_REFERENCE_DIR"])
    ref_files = {str(p.relative_to(ref_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in sorted([*ref_dir.glob("*.py"), *ref_dir.glob("utils/*.py"),
                                  *ref_dir.glob("configs/*.json")])}
    report = {"preset": args.preset, "reference_files_sha256": ref_files,
              "iters": args.iters, "tasks": args.tasks,
              "device": device_info("cpu"), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "rounds": rounds,
              "speedup_second_order": speedup(rounds, "s_per_iter"),
              "speedup_validation": speedup(rounds, "s_per_task")}
    path = args.out or ROOT / "benchmarks" / "results" / (
        f"vs-reference-{args.preset}-{time.strftime('%Y-%m-%d')}.json")
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{args.preset}: mamlpp {report['speedup_second_order']:.2f}x the reference code's "
          f"speed in second order, {report['speedup_validation']:.2f}x in validation; "
          f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
