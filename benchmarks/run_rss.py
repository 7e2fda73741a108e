"""Peak memory of a real miniimagenet-5w5s training run, data included (issue target: < 4 GiB).

    .venv/bin/python benchmarks/run_rss.py [--iters 8] [--root DIR]

`mamlpp bench` estimates a run's peak as its training phase's peak plus the bytes of the cached
data set it does not hold. This measures the thing itself: it writes a synthetic cache of the
real size (100 classes x 600 images, 84x84 RGB, 1.27 GB, with the engine's own CacheWriter) under
a temporary MAMLPP_HOME and runs `mamlpp run --preset miniimagenet-5w5s --no-tui` in the second-
order MSL phase (`maml_pp.first_order_epochs=0`: the paper's most expensive phase from the
first iteration) for one short epoch with validation and the test ensemble, sampling the run's
VmRSS (anonymous memory and mapped data file pages apart) every 50 ms. The cache is memory-mapped,
so data pages count once they are touched; a random-image cache is a worst case for nothing
but the pixel values. Writes results/run-rss-DATE.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from synthetic_cache import write_miniimagenet  # noqa: E402

from engine.bench import device_info, proc_status, write_report  # noqa: E402

GIB = 2**30


def _descendants(pid: int) -> list[int]:
    kids = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except OSError:
        return []
    return kids + [d for k in kids for d in _descendants(k)]


def run(home: Path, iters: int, eval_tasks: int) -> dict:
    overrides = ["train.epochs=1", f"train.iters_per_epoch={iters}",
                 "maml_pp.first_order_epochs=0", f"eval.val_tasks={eval_tasks}",
                 f"eval.test_tasks={eval_tasks}", "eval.ensemble_top_k=1"]
    cmd = [sys.executable, "-c", "from mamlpp_tui.cli import main; main()", "run",
           "--preset", "miniimagenet-5w5s", "--no-tui", "--name", "rss",
           *[a for o in overrides for a in ("--set", o)]]
    env = {**os.environ, "MAMLPP_HOME": str(home)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    timeline: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for pid in [proc.pid, *_descendants(proc.pid)]:
                s = {k: proc_status(k, pid) or 0 for k in peak}
                for k in peak:
                    peak[k] = max(peak[k], s[k])
                if pid == proc.pid and s["VmRSS"]:
                    timeline.append((round(time.perf_counter() - t0, 2),
                                     round(s["VmRSS"] / GIB, 3)))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    done.set()
    sampler.join()
    hwm = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"command": "mamlpp " + " ".join(cmd[3:]), "returncode": proc.returncode,
            "wall_s": time.perf_counter() - t0, "peak_rss_gib": hwm / GIB,
            "sampled_peak_gib": {k: v / GIB for k, v in peak.items()},
            "timeline_every_2s": timeline[::40], "output_tail": output[-2000:]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=8, help="meta-iterations of the run")
    ap.add_argument("--eval-tasks", type=int, default=20, help="validation and test tasks")
    ap.add_argument("--root", type=Path, default=None, help="folder for the temporary home")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="mamlpp-rss-", dir=args.root))
    try:
        write_s = write_miniimagenet(home / "data")
        result = run(home, args.iters, args.eval_tasks)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    print(result["output_tail"])
    if result["returncode"] != 0:
        print(f"the run failed (exit {result['returncode']})", file=sys.stderr)
        return 1
    report = {"schema": "mamlpp-run-rss/1",
              "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "device": device_info("cpu"), "preset": "miniimagenet-5w5s",
              "iters": args.iters, "eval_tasks": args.eval_tasks, "cache_write_s": write_s,
              "target_gib": 4.0, "met": result["peak_rss_gib"] < 4.0, **result}
    out = args.out or ROOT / "benchmarks" / "results" / (
        f"run-rss-{dt.date.today().isoformat()}.json")
    write_report(report, out)
    print(f"peak RSS {result['peak_rss_gib']:.2f} GiB (sampled: "
          + ", ".join(f"{k} {v:.2f}" for k, v in result["sampled_peak_gib"].items())
          + f"); wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
