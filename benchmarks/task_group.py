"""Tasks folded into the channels (engine/grouped.py, `train.task_group`) against one task per
pass, alternating in one process.

Learners of the same preset, one per variant `GxT` (G tasks folded per pass, T task threads),
take the same meta-batches round after round in alternating order: a meta-update of the given
derivative order (MSL phase, every step's loss). Evaluation does not fold tasks. Writes
results/task-group-DATE.json with every round's seconds and each variant's median per-round
speed-up over the first.

    python benchmarks/task_group.py --preset omniglot-5w1s --order second --variants 1x2,4x2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _measure(preset: str, order: str, variants: list[str], rounds: int) -> dict:
    from benchmarks.alternating import alternate, median_speedup
    from engine.bench import _update, synthetic_dataset
    from engine.config import resolve
    from engine.data.sampler import sampler_for
    from engine.learner import MetaLearner
    from engine.msl import msl_weights

    cfg = resolve(preset)
    t = cfg.train
    weights = msl_weights(0, t.inner_steps, cfg.maml_pp.msl_epochs, cfg.maml_pp.msl)
    sampler = sampler_for(cfg, "train", synthetic_dataset(cfg))
    learners = {}
    for v in variants:
        group, threads = (int(n) for n in v.split("x"))
        learner = MetaLearner(cfg, "cpu")
        learner.paths = replace(learner.paths, task_group=group, task_threads=threads,
                                task_threads_second_order=threads)
        learners[v] = learner

    def step(v, batch):
        _update(learners[v], batch, weights, order == "second")

    seconds = alternate(step, variants, sampler, t.meta_batch, rounds)
    base = variants[0]
    speedup = {v: median_speedup(seconds, base, v) for v in variants}
    for v in variants:
        print(f"{preset} {order} {v}: {statistics.median(seconds[v]):.3f} s, "
              f"{speedup[v]:.3f}x vs {base}", flush=True)
    return {"preset": preset, "order": order, "msl_phase": True, "variants": variants,
            "seconds": seconds, "speedup_median_ratio": speedup}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", action="append", default=None)
    parser.add_argument("--order", choices=("first", "second"), action="append",
                        default=None)
    parser.add_argument("--variants", default="1x2,4x2",
                        help="comma-separated GxT: G tasks folded per pass on T task threads; "
                             "the first is the baseline")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", default=None,
                        help="result file (default results/task-group-DATE.json)")
    args = parser.parse_args()
    from engine.bench import device_info, write_report

    variants = args.variants.split(",")
    runs = [_measure(preset, order, variants, args.rounds)
            for preset in args.preset or ["omniglot-5w1s"]
            for order in args.order or ["second"]]
    path = Path(args.out) if args.out else (
        ROOT / "benchmarks" / "results" / f"task-group-{time.strftime('%Y-%m-%d')}.json")
    report = {"schema": "mamlpp-task-group/1", "device": device_info("cpu"), "runs": runs}
    if path.exists():  # several invocations on one day add up
        report["runs"] = json.loads(path.read_text())["runs"] + runs
    write_report(report, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
