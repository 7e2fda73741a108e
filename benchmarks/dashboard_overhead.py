"""Engine throughput with and without a dashboard attached (issue: within 3%).

Runs the same small quickstart run several times in the background engine, alternating "alone"
and "with a headless dashboard process watching it", and compares the median seconds per
training iteration read from the runs' own `train` events (validation gaps excluded).

    python benchmarks/dashboard_overhead.py [--repeats 3] [--out benchmarks/results/...json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETS = ["train.epochs=2", "train.iters_per_epoch=80", "eval.val_tasks=20",
        "eval.test_tasks=20", "train.meta_batch=4"]
DASHBOARD = """
import sys
from pathlib import Path
from mamlpp_tui.dashboard.app import DashboardApp
app = DashboardApp(Path(sys.argv[1]))
app.run(headless=True, size=(120, 40))
"""


def iteration_seconds(run_dir: Path) -> list[float]:
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    train = [(e["iteration"], e["time"]) for e in events if e["type"] == "train"]
    out = []
    for (i0, t0), (i1, t1) in zip(train, train[1:]):
        if i1 == i0 + 1 and (i0 % 80) != 0:  # consecutive, not across a validation
            out.append(t1 - t0)
    return out


def one_run(home: Path, with_dashboard: bool) -> float:
    env = dict(os.environ, MAMLPP_HOME=str(home))
    sets = [a for s in SETS for a in ("--set", s)]
    r = subprocess.run([sys.executable, "-m", "mamlpp_tui", "run", "--detach", *sets],
                       env=env, capture_output=True, text=True, check=True)
    run_id = r.stdout.strip().splitlines()[-1]
    run_dir = home / "runs" / run_id
    viewer = None
    if with_dashboard:
        viewer = subprocess.Popen([sys.executable, "-c", DASHBOARD, str(run_dir)], env=env,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
    while json.loads((run_dir / "status.json").read_text())["state"] not in (
            "finished", "failed", "stopped"):
        time.sleep(0.5)
    if viewer is not None:
        assert viewer.poll() is None, "the dashboard died"
        viewer.terminate()
        viewer.wait()
    return statistics.median(iteration_seconds(run_dir))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path,
                        default=REPO / "benchmarks" / "results" / "dashboard-overhead.json")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="mamlpp-dash-"))
    alone, watched = [], []
    for _ in range(args.repeats):
        alone.append(one_run(home, False))
        watched.append(one_run(home, True))
    a, w = statistics.median(alone), statistics.median(watched)
    result = {"alone_s_per_iter": alone, "with_dashboard_s_per_iter": watched,
              "median_alone": a, "median_with_dashboard": w, "overhead": w / a - 1,
              "loadavg_after": os.getloadavg(), "cores": os.cpu_count(), "config": SETS}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
