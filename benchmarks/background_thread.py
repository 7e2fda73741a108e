"""The plain path (one task at a time, intra-op threads = cores) with and without a live
background thread that runs torch ops, as the engine's data prefetcher does.

The conditions alternate in one process, round after round, each timed over a few meta-updates
with the same batches, so that the machine's drift (10-25% between minutes here) cancels. A
thread's OpenMP team lives as long as the thread, so each background thread is stopped and
joined before the next condition:

- `none`: no other thread;
- `thread`: a plain `threading.Thread` that ran one parallel torch op and stays alive (what
  the prefetcher was before engine.task_threads.start_worker_thread);
- `worker`: the same op in a thread started by `start_worker_thread` (one intra-op thread);
- `prefetcher`: the engine's Prefetcher alive beside the training thread, as in training.

Writes results/background-thread-DATE.json and prints, per condition, the median over rounds
of its time over the same round's `none` (drift within a run moved `none` by 50%).

    python benchmarks/background_thread.py [--preset omniglot-5w1s] [--rounds 8] [--iters 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

CONDITIONS = ("none", "thread", "worker", "prefetcher")
ROOT = Path(__file__).resolve().parents[1]


def _run(preset: str, rounds: int, iters: int, progress) -> dict[str, list[list[float]]]:
    """Seconds of second-order plain meta-updates (MSL phase) per condition and round."""
    import torch

    from engine.bench import synthetic_dataset
    from engine.config import resolve
    from engine.data import Prefetcher, sampler_for
    from engine.learner import MetaLearner
    from engine.msl import msl_weights
    from engine.task_threads import start_worker_thread

    cfg = resolve(preset, overrides=["train.task_threads=1", "train.channels_last=never"])
    learner = MetaLearner(cfg)
    sampler = sampler_for(cfg, "train", synthetic_dataset(cfg))
    mb = cfg.train.meta_batch
    weights = msl_weights(0, cfg.train.inner_steps, cfg.maml_pp.msl_epochs)
    batches = [sampler.batch(i * mb, mb) for i in range(iters)]
    learner.update(batches[0], weights, True, 1e-3)  # warm-up

    def timed(source=None) -> list[float]:
        out = []
        for batch in source or batches:
            t0 = time.perf_counter()
            learner.update(batch, weights, True, 1e-3)
            out.append(time.perf_counter() - t0)
        return out

    def with_thread(start) -> list[float]:
        stop, ran = threading.Event(), threading.Event()

        def one_parallel_op() -> None:
            torch.ones(1 << 20).mul_(2).sum()  # large enough for an OpenMP parallel region
            ran.set()
            stop.wait()

        thread = start(one_parallel_op)
        ran.wait()
        try:
            return timed()
        finally:
            stop.set()
            thread.join()

    def plain(target):
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        return thread

    def prefetching() -> list[float]:
        # the batches come from it, as in training: it assembles the next while one trains
        with Prefetcher(sampler, 0, mb, iters) as prefetcher:
            return timed(prefetcher)

    conditions = {
        "none": timed,
        "thread": lambda: with_thread(plain),
        "worker": lambda: with_thread(lambda t: start_worker_thread(t, "bench-worker")),
        "prefetcher": prefetching,
    }
    samples: dict[str, list[list[float]]] = {c: [] for c in CONDITIONS}
    for r in range(rounds):
        for name in CONDITIONS:
            samples[name].append(conditions[name]())
            progress(f"round {r + 1} {name:10s} {statistics.median(samples[name][-1]):.3f} s/iter")
    return samples


def vs_none(rounds: dict[str, list[float]]) -> dict[str, float]:
    """Each condition's median, over rounds, of its time over the same round's `none`."""
    return {c: statistics.median(a / b for a, b in zip(v, rounds["none"], strict=True))
            for c, v in rounds.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="omniglot-5w1s")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    samples = _run(args.preset, args.rounds, args.iters,
                   lambda m: print(m, file=sys.stderr, flush=True))
    rounds = {c: [statistics.median(t) for t in v] for c, v in samples.items()}
    import torch

    from engine.bench import device_info

    medians = {c: statistics.median(v) for c, v in rounds.items()}
    report = {
        "what": "plain path, second order (MSL phase), with a live background torch thread",
        "preset": args.preset, "rounds": args.rounds, "iters": args.iters,
        "device": device_info("cpu"), "torch_threads": torch.get_num_threads(),
        "round_medians": rounds, "samples": samples, "median_of_rounds": medians,
        "vs_none": vs_none(rounds),
    }
    path = args.out or ROOT / "benchmarks" / "results" / (
        f"background-thread-{time.strftime('%Y-%m-%d')}.json")
    path.write_text(json.dumps(report, indent=1) + "\n")
    for c in CONDITIONS:
        print(f"{c:10s} {medians[c]:.3f} s/iter, {report['vs_none'][c]:.3f}x the same round's "
              "none")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
