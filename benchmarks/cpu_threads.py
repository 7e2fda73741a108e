"""Intra-op threads vs task threads on a small CPU, idle and with one core taken by another process.

    .venv/bin/python benchmarks/cpu_threads.py [--preset omniglot-5w1s] [--iters 3]

Times one meta-update (the loop implementation's `meta_batch`, which is what `meta_loss` runs)
of a preset's synthetic meta-batch in three ways:

- `intra2`: tasks one after another, torch's intra-op threads = 2 (the engine's default here);
- `intra1`: tasks one after another, one thread;
- `tasks2`: the meta-batch split in two halves run by two Python threads, one intra-op thread
  each (a prototype of task-parallel execution; gradients accumulate into the same `.grad`);

first with the machine as it is, then while a busy-looping process (started and stopped here)
takes one core, as another user's job would. Writes benchmarks/results/cpu-threads-DATE.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engine.bench import device_info, synthetic_dataset, write_report  # noqa: E402
from engine.config import resolve  # noqa: E402
from engine.data.sampler import TaskSampler  # noqa: E402
from engine.inner_loop import InnerPlan  # noqa: E402
from engine.learner import MetaLearner  # noqa: E402
from engine.meta_batch import meta_batch  # noqa: E402
from engine.msl import msl_weights  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="omniglot-5w1s")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    cfg = resolve(args.preset, overrides=["train.impl=loop"])
    d, steps = cfg.data, cfg.train.inner_steps
    learner = MetaLearner(cfg)
    weights = torch.tensor(msl_weights(0, steps, cfg.maml_pp.msl_epochs))
    sampler = TaskSampler(synthetic_dataset(cfg), "train", d.ways, d.shots, d.queries, 0)
    batch = sampler.batch(0, cfg.train.meta_batch)

    def run(order: str, how: str) -> None:
        plan = InnerPlan(steps, tuple(range(steps)), order == "second", track_stats=True)
        learner.optimizer.zero_grad(set_to_none=True)
        if how != "tasks2":
            meta_batch(learner.meta, batch, plan, weights, "loop")
            return
        n = batch.size
        halves = [batch.slice(0, n // 2), batch.slice(n // 2, n)]
        threads = [threading.Thread(target=meta_batch,
                                    args=(learner.meta, h, plan, weights, "loop"))
                   for h in halves]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def timed(order: str, how: str) -> dict:
        torch.set_num_threads(2 if how == "intra2" else 1)
        run(order, how)  # warm-up
        seconds = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            run(order, how)
            seconds.append(time.perf_counter() - t0)
        return {"seconds": seconds, "median": statistics.median(seconds),
                "load_average": list(os.getloadavg())}

    results: dict = {}
    for condition in ("as-is", "one-core-busy"):
        busy = None
        if condition == "one-core-busy":
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(1)
        try:
            for order in ("first", "second"):
                for how in ("intra2", "intra1", "tasks2"):
                    r = timed(order, how)
                    results.setdefault(condition, {}).setdefault(order, {})[how] = r
                    print(f"{condition:14s} {order:6s} {how:7s} {r['median']:.3f} s/iter",
                          flush=True)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    report = {"schema": "mamlpp-bench-threads/1",
              "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "preset": args.preset, "device": device_info("cpu"), "results": results}
    out = args.out or ROOT / "benchmarks" / "results" / (
        f"cpu-threads-{dt.date.today().isoformat()}.json")
    write_report(report, out)
    print(json.dumps({c: {o: {h: round(v["median"], 3) for h, v in x.items()}
                          for o, x in r.items()} for c, r in results.items()}))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
