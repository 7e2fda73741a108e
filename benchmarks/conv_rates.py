"""The convolutions' own rate on this machine, next to its matmul yardstick.

Every second-order step is mostly 3x3 convolutions run by torch (oneDNN on the CPU). This times
each direction of one convolution, forward, input gradient and weight gradient, at the paper
presets' largest shapes, NCHW and channels-last on one thread and NCHW on two intra-op threads,
against a 2048x2048 float32 matmul on one thread and on two threads (one matmul each) measured
in the same process: what a kernel could reach, and how much the second core adds. Writes
results/conv-rates-DATE.json.

    python benchmarks/conv_rates.py
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.op_timing import best_ms  # noqa: E402

# (images, channels in, side, channels out): query passes of mini-ImageNet's first three
# stages, a support pass of 5-way 1-shot, Omniglot's 5w5s support and 20w5s query passes
SHAPES = [(75, 48, 84, 48), (75, 48, 42, 48), (75, 48, 21, 48), (5, 48, 84, 48),
          (25, 64, 28, 64), (100, 64, 28, 64), (100, 64, 14, 64)]


def matmul_rate(threads: int, n: int = 2048, repeats: int = 4) -> float:
    """GFLOP/s of `threads` Python threads each multiplying n x n float32 matrices on one
    intra-op thread, all at once."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b

    def work():
        for _ in range(repeats):
            a @ b

    workers = [threading.Thread(target=work) for _ in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return 2 * n**3 * repeats * threads / (time.perf_counter() - start) / 1e9


def conv_rates(images: int, c_in: int, side: int, c_out: int, channels_last: bool) -> dict:
    import torch
    import torch.nn.functional as F

    x = torch.randn(images, c_in, side, side)
    w = torch.randn(c_out, c_in, 3, 3)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(F.conv2d(x, w, padding=1))
    flops = 2 * images * c_out * c_in * 9 * side * side

    def backward(mask):
        return lambda: torch.ops.aten.convolution_backward(
            g, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)

    def time_ms(fn):  # best of 3 single calls after one warm-up call
        return best_ms(fn, repeats=3, warmup=1, calls=1)

    ms = {"forward": time_ms(lambda: F.conv2d(x, w, padding=1)),
          "input_gradient": time_ms(backward([True, False, False])),
          "weight_gradient": time_ms(backward([False, True, False]))}
    return {"shape": [images, c_in, side, side], "out_channels": c_out,
            "layout": "channels_last" if channels_last else "nchw", "gflop": flops / 1e9,
            "ms": {k: round(v, 2) for k, v in ms.items()},
            "gflop_per_s": {k: round(flops / v / 1e6, 1) for k, v in ms.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch

    from engine.bench import device_info, write_report

    torch.set_num_threads(1)
    yardstick = {"one_thread": [], "two_threads": []}
    rows = []
    for shape in SHAPES:
        yardstick["one_thread"].append(round(matmul_rate(1), 1))
        yardstick["two_threads"].append(round(matmul_rate(2), 1))
        for channels_last, threads in ((False, 1), (True, 1), (False, 2)):
            torch.set_num_threads(threads)
            rows.append(conv_rates(*shape, channels_last))
            torch.set_num_threads(1)
            r = rows[-1]
            r["intra_op_threads"] = threads
            print(f"{r['shape']} -> {r['out_channels']} {r['layout']} on {threads} thread(s): "
                  + ", ".join(f"{k} {v} GFLOP/s" for k, v in r["gflop_per_s"].items()),
                  flush=True)
    print(f"matmul one thread {yardstick['one_thread']}, two threads "
          f"{yardstick['two_threads']} GFLOP/s")
    path = args.out or (ROOT / "benchmarks" / "results"
                        / f"conv-rates-{time.strftime('%Y-%m-%d')}.json")
    write_report({"schema": "mamlpp-conv-rates/1", "device": device_info("cpu"),
                  "matmul_gflop_per_s": yardstick, "convolutions": rows}, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
