"""Single ops of the base network on the CPU at the presets' activation shapes.

    .venv/bin/python benchmarks/cpu_ops.py [--threads 1]

Compares what `engine.model.forward` runs with cheaper equivalents:
- the running-statistics variance `x.var(dim=(0, 2, 3))` vs E[x^2] - E[x]^2 (and batch norm
  itself, which computes the same statistics internally);
- max-pool and conv in NCHW vs channels_last.
Writes benchmarks/results/cpu-ops-DATE.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engine.bench import device_info, write_report  # noqa: E402

# (what, activation shape): first-stage activations of a support or query set.
SHAPES = {
    "omniglot-5w1s support/query, stage 1": (5, 64, 28, 28),
    "omniglot-20w5s support, stage 1": (100, 64, 28, 28),
    "miniimagenet-5w5s support, stage 1": (25, 48, 84, 84),
    "miniimagenet-5w5s query, stage 1": (75, 48, 84, 84),
}


def ms(f, reps: int = 7) -> float:
    f()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def measure(shape: tuple[int, ...]) -> dict:
    x = torch.randn(shape)
    xc = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(shape[1], shape[1], 3, 3)
    wc = w.contiguous(memory_format=torch.channels_last)
    n = x.numel() / x.shape[1]
    dims = (0, 2, 3)

    def moments(t):
        m = t.mean(dims)
        return m, ((t * t).mean(dims) - m * m) * (n / (n - 1))

    return {
        "var_dims_0_2_3_ms": ms(lambda: x.var(dims, unbiased=True)),
        "mean_dims_0_2_3_ms": ms(lambda: x.mean(dims)),
        "moments_e_x2_minus_e_x_sq_ms": ms(lambda: moments(x)),
        "batch_norm_train_ms": ms(lambda: F.batch_norm(x, None, None, training=True)),
        "max_pool2d_nchw_ms": ms(lambda: F.max_pool2d(x, 2)),
        "max_pool2d_channels_last_ms": ms(lambda: F.max_pool2d(xc, 2)),
        "conv3x3_nchw_ms": ms(lambda: F.conv2d(x, w, padding=1)),
        "conv3x3_channels_last_ms": ms(lambda: F.conv2d(xc, wc, padding=1)),
        "moments_max_abs_diff": (moments(x)[1] - x.var(dims)).abs().max().item(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    for name, shape in SHAPES.items():
        row = measure(shape)
        results[name] = {"shape": list(shape), **row}
        print(name, json.dumps({k: round(v, 3) if k.endswith("ms") else v
                                for k, v in row.items()}), flush=True)
    report = {"schema": "mamlpp-bench-ops/1",
              "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "threads": args.threads, "device": device_info("cpu"), "results": results}
    out = args.out or ROOT / "benchmarks" / "results" / (
        f"cpu-ops-{dt.date.today().isoformat()}.json")
    write_report(report, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
