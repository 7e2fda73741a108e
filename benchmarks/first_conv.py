"""The default path with and without engine/first_conv.py (the first convolution of
single-channel images with its weight gradient as a batched matmul), alternating in one process.

Two learners of the same preset take the same batches round after round, in alternating order
(a meta-update, or with `--order validation` an evaluation of a meta-batch of tasks);
`off` makes `first_conv.applies` say no, so that learner runs torch's convolution backward.
Writes results/first-conv-DATE.json with every round's seconds and the median per-round ratio.

    python benchmarks/first_conv.py [--preset omniglot-5w1s] [--order second] [--rounds 8]
        [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _measure(preset: str, order: str, rounds: int) -> dict:
    import engine.first_conv as fc
    from benchmarks.alternating import alternate, median_speedup
    from engine.bench import _update, synthetic_dataset
    from engine.config import resolve
    from engine.data.sampler import sampler_for
    from engine.learner import MetaLearner
    from engine.msl import msl_weights

    applies = fc.applies
    cfg = resolve(preset)
    t = cfg.train
    second = order == "second"
    weights = msl_weights(0, t.inner_steps, cfg.maml_pp.msl_epochs, cfg.maml_pp.msl)
    sampler = sampler_for(cfg, "train", synthetic_dataset(cfg))
    learners = {"off": MetaLearner(cfg, "cpu"), "on": MetaLearner(cfg, "cpu")}

    def step(name, batch):
        fc.applies = applies if name == "on" else (lambda *a: False)
        if order == "validation":  # evaluate's first-order adaptation of meta_batch tasks
            learners[name].evaluate(batch)
        else:
            _update(learners[name], batch, weights, second)

    try:
        seconds = alternate(step, ["off", "on"], sampler, t.meta_batch, rounds)
    finally:
        fc.applies = applies
    ratio = median_speedup(seconds, "off", "on")
    print(f"{preset} {order} order: off {statistics.median(seconds['off']):.3f} s, "
          f"on {statistics.median(seconds['on']):.3f} s, {ratio:.3f}x", flush=True)
    return {"preset": preset, "order": order, "msl_phase": True, "seconds": seconds,
            "speedup_median_ratio": ratio}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", action="append", default=None)
    parser.add_argument("--order", choices=("first", "second", "validation"), action="append",
                        default=None)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None,
                        help="result file (default results/first-conv-DATE.json)")
    args = parser.parse_args()
    from engine.bench import device_info, write_report

    runs = [_measure(preset, order, args.rounds)
            for preset in args.preset or ["omniglot-5w1s"]
            for order in args.order or ["second"]]
    path = args.out or (ROOT / "benchmarks" / "results"
                        / f"first-conv-{time.strftime('%Y-%m-%d')}.json")
    write_report({"device": device_info("cpu"), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "rounds": args.rounds, "runs": runs}, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
