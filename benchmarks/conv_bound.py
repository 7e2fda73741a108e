"""How fast mamlpp could be against the paper authors' code with the convolutions as they are.

Both run the same convolutions (torch's oneDNN kernels, the same shapes, the same FLOPs), so the
reference code's step cannot take less than its own convolutions' time, and mamlpp's step no
less than its own. On one thread, where torch.profiler's self time is exact, each round profiles
one second-order step (every step's loss) of the reference code and one of mamlpp's default path,
in fresh processes one after the other, and reports:

- the speed-up now (reference step / mamlpp step),
- the "free rest" bound (reference step / mamlpp's convolutions): the speed-up if everything
  in mamlpp's step but the convolutions took no time,
- each side's share of the step in convolutions.

Where the free-rest bound is under 2, issue 20's 2x cannot come from the rest of the step, only
from faster convolutions than torch's. Needs the reference files (MAMLPP_REFERENCE_DIR, see
benchmarks/reference_harness.py). Writes results/conv-bound-DATE.json.

    MAMLPP_REFERENCE_DIR=/path/to/reference-files \\
        python benchmarks/conv_bound.py --preset miniimagenet-5w1s --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from profile_step import PAPER_PRESETS, by_kind, self_us_by_op  # noqa: E402
from vs_reference import REFERENCE_NAME  # noqa: E402

from benchmarks.alternating import child_json  # noqa: E402


def _profiled(step) -> dict:
    """One call of `step` under torch.profiler: its wall time, and its convolutions' self time
    and share of the profiled self time."""
    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    wall = time.perf_counter() - start
    kinds = by_kind(self_us_by_op(prof))
    return {"step_s": wall, "conv_s": kinds["convolution"] / 1e6,
            "conv_share": kinds["convolution"] / sum(kinds.values())}


def _reference_child(preset: str) -> dict:
    import reference_harness as harness
    import torch

    torch.set_num_threads(1)
    config = os.path.join(harness.HERE, harness.PRESETS[REFERENCE_NAME[preset]]["config"])
    real_stdout, sys.stdout = sys.stdout, sys.stderr  # the reference prints while building
    try:
        args, _, model = harness.build_reference(config)
    finally:
        sys.stdout = real_stdout
    gen = torch.Generator().manual_seed(1234)
    model.run_train_iter(data_batch=harness.make_batch(args, args.batch_size, gen), epoch=0)
    batch = harness.make_batch(args, args.batch_size, gen)
    # epoch 0: second order, every step's loss
    return _profiled(lambda: model.run_train_iter(data_batch=batch, epoch=0))


def _mamlpp_child(preset: str) -> dict:
    import torch
    from profile_step import one_thread_learner

    from engine.bench import _update

    torch.set_num_threads(1)
    learner, sampler, weights = one_thread_learner(preset)
    t = learner.config.train
    _update(learner, sampler.batch(0, t.meta_batch), weights, True)
    batch = sampler.batch(t.meta_batch, t.meta_batch)
    return {**_profiled(lambda: _update(learner, batch, weights, True)),
            "task_group": learner.paths.task_group,
            "fused_kernels": learner.paths.fused_kernels}


def _child(side: str, preset: str) -> dict:
    cwd = os.environ["MAMLPP_REFERENCE_DIR"] if side == "reference" else str(ROOT)
    return child_json([sys.executable, __file__, "--child", side, "--preset", preset], cwd,
                      dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", action="append", choices=PAPER_PRESETS, default=None,
                        help="repeatable; default: the six paper presets")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", choices=["reference", "mamlpp"], help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run = _reference_child if args.child == "reference" else _mamlpp_child
        Path(args.child_out).write_text(json.dumps(run(args.preset[0])))
        return 0
    if not os.environ.get("MAMLPP_REFERENCE_DIR"):
        print("error: set MAMLPP_REFERENCE_DIR to a folder of the reference code's files "
              "(benchmarks/reference_harness.py lists them).", file=sys.stderr)
        return 2
    from engine.bench import device_info, write_report

    runs = []
    for preset in args.preset or PAPER_PRESETS:
        rounds = []
        for i in range(args.rounds):
            rounds.append({side: _child(side, preset) for side in ("reference", "mamlpp")})
            ref, ours = rounds[-1]["reference"], rounds[-1]["mamlpp"]
            print(f"{preset} round {i + 1}: reference {ref['step_s']:.2f} s "
                  f"(convolutions {ref['conv_share']:.0%}), mamlpp {ours['step_s']:.2f} s "
                  f"(convolutions {ours['conv_share']:.0%}): {ref['step_s'] / ours['step_s']:.2f}x"
                  f" now, {ref['step_s'] / ours['conv_s']:.2f}x with a free rest", flush=True)
        runs.append({
            "preset": preset, "order": "second", "msl_phase": True, "threads": 1,
            "rounds": rounds,
            "speedup_now": statistics.median(
                r["reference"]["step_s"] / r["mamlpp"]["step_s"] for r in rounds),
            "speedup_free_rest": statistics.median(
                r["reference"]["step_s"] / r["mamlpp"]["conv_s"] for r in rounds),
        })
    path = args.out or (ROOT / "benchmarks" / "results"
                        / f"conv-bound-{time.strftime('%Y-%m-%d')}.json")
    write_report({"schema": "mamlpp-conv-bound/1", "device": device_info("cpu"), "runs": runs},
                 path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
