"""First-order training steps and evaluation channels-last (the old default) against NCHW,
where batch norm and the max-pool take engine/fused_cpu.py's kernels and the 3x3 convolutions
engine/fft_conv.py's, alternating in one process on each preset's synthetic tasks: training in
both loss phases (every step's loss counting, then only the last's), and evaluation (first
order, no graph) of a batch of validation tasks.

    python benchmarks/first_order_layout.py [--preset omniglot-20w5s ...] [--rounds 4]

Writes results/first-order-layout-DATE.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = ["omniglot-5w1s", "omniglot-5w5s", "omniglot-20w1s", "omniglot-20w5s",
           "miniimagenet-5w1s", "miniimagenet-5w5s"]
VARIANTS = {"channels_last": ["train.channels_last=first_order"],
            "nchw": ["train.channels_last=never"]}


def _evaluation(preset: str, rounds: int, tasks: int) -> dict:
    from benchmarks.alternating import alternate, learners_for, median_speedup

    _, learners, sampler = learners_for(preset, VARIANTS, "val")
    seconds = alternate(lambda name, batch: learners[name].evaluate(batch), list(VARIANTS),
                        sampler, tasks, rounds)
    ratio = median_speedup(seconds, *VARIANTS)
    per_task = {k: statistics.median(v) / tasks for k, v in seconds.items()}
    print(f"{preset} evaluation: channels_last {per_task['channels_last']:.4f} s/task, "
          f"nchw {per_task['nchw']:.4f} s/task, {ratio:.3f}x", flush=True)
    return {"preset": preset, "tasks": tasks, "seconds": seconds, "s_per_task": per_task,
            "paths": {k: v.paths.to_dict() for k, v in learners.items()},
            "speedup_median_ratio": ratio}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", action="append", default=None)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=10, help="validation tasks per round")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from benchmarks.alternating import alternating_steps
    from engine.allocator import retain_freed_memory
    from engine.bench import device_info, matmul_throughput, write_report

    retain_freed_memory()
    presets = args.preset or PRESETS
    steps = [alternating_steps(p, VARIANTS, args.rounds, second_order=False, every_step=every)
             for p in presets for every in (True, False)]
    evaluation = [_evaluation(p, args.rounds, args.tasks) for p in presets]
    path = Path(args.out) if args.out else (
        ROOT / "benchmarks" / "results" / f"first-order-layout-{time.strftime('%Y-%m-%d')}.json")
    write_report({"schema": "mamlpp-first-order-layout/1", "device": device_info("cpu"),
                  "matmul": matmul_throughput("cpu"), "steps": steps, "evaluation": evaluation},
                 path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
