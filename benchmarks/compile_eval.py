"""torch.compile of the network in evaluation (first order), against the eager default.

    .venv/bin/python benchmarks/compile_eval.py [--preset NAME ...] [--rounds 6]

Evaluation is the pass compile could take whole: no second derivative (double backward cannot
be compiled) and many tasks of one shape. The network forward (`engine.model.forward`) is
compiled with inductor (`dynamic=False`); AOTAutograd compiles its backward, so each inner step's
forward and backward run fused. Validation batches alternate between the eager and the compiled
network on the same learner (one task thread, so the compiled code runs on the calling thread),
and the final-step logits of the last batch are compared. Writes
results/compile-eval-DATE.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# time a real compile, not inductor's on-disk cache of an earlier run
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import torch  # noqa: E402

import engine.inner_loop as inner_loop  # noqa: E402
from engine.bench import device_info, synthetic_dataset, write_report  # noqa: E402
from engine.config import resolve  # noqa: E402
from engine.data.sampler import TaskSampler  # noqa: E402
from engine.learner import MetaLearner  # noqa: E402
from engine.model import forward  # noqa: E402


def measure(preset: str, rounds: int) -> dict:
    cfg = resolve(preset, overrides=["train.task_threads=1"])
    d = cfg.data
    sampler = TaskSampler(synthetic_dataset(cfg), "val", d.ways, d.shots, d.queries, 0)
    learner = MetaLearner(cfg, "cpu")
    tasks = 10 if d.dataset == "omniglot" else 2
    # one graph per inner step (the BN row) and pass kind: more than dynamo's default limit of 8
    torch._dynamo.config.recompile_limit = 64
    compiled = torch.compile(forward, dynamic=False)

    def run(net, i: int) -> tuple[float, torch.Tensor]:
        inner_loop.forward = net
        try:
            batch = sampler.batch(i * tasks, tasks)
            t0 = time.perf_counter()
            logits = learner.evaluate(batch).logits
            return (time.perf_counter() - t0) / tasks, logits
        finally:
            inner_loop.forward = forward

    t0 = time.perf_counter()
    run(compiled, 0)
    first_call = time.perf_counter() - t0
    eager, fused = [], []
    for i in range(rounds):
        a, la = run(forward, i + 1)
        b, lb = run(compiled, i + 1)
        eager.append(a)
        fused.append(b)
    return {
        "preset": preset, "tasks_per_batch": tasks, "rounds": rounds,
        "compile_first_call_s": first_call,
        "eager_s_per_task": statistics.median(eager),
        "compiled_s_per_task": statistics.median(fused),
        "speedup": statistics.median(eager) / statistics.median(fused),
        "eager_seconds": eager, "compiled_seconds": fused,
        "logits_max_abs_diff": (la - lb).abs().max().item(),
        "logits_max_abs": la.abs().max().item(),
        "argmax_agreement": (la.argmax(-1) == lb.argmax(-1)).float().mean().item(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", action="append")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    presets = args.preset or ["omniglot-5w1s", "miniimagenet-5w5s"]
    results = []
    for p in presets:
        r = measure(p, args.rounds)
        print(f"{p}: eager {r['eager_s_per_task']:.4f} s/task, compiled "
              f"{r['compiled_s_per_task']:.4f} ({r['speedup']:.2f}x; first call "
              f"{r['compile_first_call_s']:.0f} s), logits differ by up to "
              f"{r['logits_max_abs_diff']:.2g} of {r['logits_max_abs']:.2g}", flush=True)
        results.append(r)
    today = dt.date.today().isoformat()
    out = args.out or ROOT / "benchmarks" / "results" / f"compile-eval-{today}.json"
    write_report({"schema": "mamlpp-compile-eval/1", "created": dt.datetime.now(dt.UTC)
                  .isoformat(timespec="seconds"), "device": device_info("cpu"),
                  "threads": args.threads, "torch": torch.__version__, "results": results}, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
