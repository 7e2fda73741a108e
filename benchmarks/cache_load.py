"""Time loading a full-size cached mini-ImageNet (100 classes x 600 images, 84x84 RGB).

    .venv/bin/python benchmarks/cache_load.py [--root DIR]

Writes a synthetic cache of the real size with the engine's own CacheWriter (about 1.3 GB in a
temporary folder, removed after), then times, in fresh processes: `load_dataset` (the engine's
start-up path), the first training task batch, and reading every image once (what a run
touches over its first epochs). Page cache dropped first when this user may (root), so "cold"
is a real disk read; otherwise the numbers are warm. Writes results/cache-load-DATE.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from synthetic_cache import IMAGES, write_miniimagenet  # noqa: E402

_PROBE = """
import json, sys, time, resource
t0 = time.perf_counter()
from engine.data.datasets import load_dataset
from engine.data.sampler import TaskSampler
from pathlib import Path
t_import = time.perf_counter() - t0
t0 = time.perf_counter()
ds = load_dataset("miniimagenet", Path(sys.argv[1]))
t_load = time.perf_counter() - t0
t0 = time.perf_counter()
TaskSampler(ds, "train", 5, 5, 15, 0).batch(0, 2)
t_first = time.perf_counter() - t0
t0 = time.perf_counter()
total = sum(int(c.sum(dtype=__import__("torch").int64)) for x in ds.splits.values() for c in x)
t_all = time.perf_counter() - t0
print(json.dumps({"import_s": t_import, "load_dataset_s": t_load, "first_batch_s": t_first,
                  "read_all_s": t_all,
                  "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def _drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    from engine.bench import write_report

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=None, help="folder for the temporary cache")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="mamlpp-cache-bench-", dir=args.root))
    try:
        write_s = write_miniimagenet(root)
        runs = {}
        for label in ("cold", "warm"):
            dropped = _drop_caches() if label == "cold" else False
            out = subprocess.run([sys.executable, "-c", _PROBE, str(root)], cwd=ROOT,
                                 capture_output=True, text=True, check=True).stdout
            runs[label] = {**json.loads(out.splitlines()[-1]), "page_cache_dropped": dropped}
            print(label, runs[label], flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report = {"schema": "mamlpp-cache-load/1",
              "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "images": IMAGES, "write_s": write_s, **runs}
    out = args.out or ROOT / "benchmarks" / "results" / (
        f"cache-load-{dt.date.today().isoformat()}.json")
    write_report(report, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
