"""NNPACK's Fourier-domain convolutions (engine/fft_conv.py) against torch's (oneDNN's), one
convolution at a time on one thread and in whole second-order steps.

Per convolution, at the presets' shapes: the forward alone, a first-order pass (forward, input
and weight gradients) and a second-order one (the first derivatives kept in the graph and
differentiated again), each as the best of several repeats, with the float32 error of the
output against float64 (largest difference over the largest value). Per step: `train.fft_conv`
off and on, alternating on the same meta-batches, second order with every step's loss, on each
preset given. Writes results/fft-conv-DATE.json.

    python benchmarks/fft_conv.py [--preset omniglot-5w5s ...] [--rounds 3] [--ops-only]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.op_timing import best_ms  # noqa: E402

# (images, in channels, out channels, side): Omniglot's second stage (support and query
# passes of 5w5s, 20w5s's support), its first; mini-ImageNet's first and second
SHAPES = [(25, 64, 64, 14), (75, 64, 64, 14), (100, 64, 64, 14), (25, 1, 64, 28),
          (25, 3, 48, 84), (75, 3, 48, 84), (25, 48, 48, 42), (75, 48, 48, 42)]
PRESETS = ["omniglot-5w5s", "omniglot-20w1s", "omniglot-20w5s", "miniimagenet-5w1s",
           "miniimagenet-5w5s"]


def _passes(conv, x, w, b):
    """The three passes, as functions of no arguments."""
    def forward():
        with torch.no_grad():
            conv(x, w, b)

    def first():
        y = conv(x, w, b)
        torch.autograd.grad((y * y).sum(), (x, w, b))

    def second():
        y = conv(x, w, b)
        gx, gw, gb = torch.autograd.grad((y * y).sum(), (x, w, b), create_graph=True)
        (gx.square().sum() + gw.square().sum() + gb.square().sum()).backward()

    return {"forward": forward, "first_order": first, "second_order": second}


def _op_row(shape) -> dict:
    from engine import fft_conv

    n, c, k, size = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, size, size, generator=g, requires_grad=True)
    w = (torch.randn(k, c, 3, 3, generator=g) * 0.1).requires_grad_()
    b = torch.zeros(k, requires_grad=True)
    exact = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    scale = exact.abs().max().item()
    row = {"shape": list(shape), "gflop_forward": 2 * n * size * size * 9 * c * k / 1e9}
    for name, conv in (("onednn", lambda *a: F.conv2d(*a, padding=1)),
                       ("fft", fft_conv.conv3x3)):
        with torch.no_grad():
            row[f"{name}_error"] = (conv(x, w, b).double() - exact).abs().max().item() / scale
        for kind, f in _passes(conv, x, w, b).items():
            row[f"{name}_{kind}_ms"] = best_ms(f, repeats=3)
    for kind in ("forward", "first_order", "second_order"):
        row[f"speedup_{kind}"] = round(row[f"onednn_{kind}_ms"] / row[f"fft_{kind}_ms"], 3)
    print(f"{shape}: " + ", ".join(f"{kind} {row[f'onednn_{kind}_ms']:.1f} -> "
                                   f"{row[f'fft_{kind}_ms']:.1f} ms"
                                   for kind in ("forward", "first_order", "second_order"))
          + f"; error {row['onednn_error']:.1e} -> {row['fft_error']:.1e}", flush=True)
    return row


def _steps(preset: str, rounds: int) -> dict:
    from benchmarks.alternating import alternating_steps

    return alternating_steps(preset, {k: [f"train.fft_conv={k}"] for k in ("off", "on")},
                             rounds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", action="append", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--ops-only", action="store_true", help="skip the whole steps")
    args = parser.parse_args()

    from engine.allocator import retain_freed_memory
    from engine.bench import device_info, matmul_throughput, write_report

    retain_freed_memory()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ops = [_op_row(shape) for shape in SHAPES]
    matmul = matmul_throughput("cpu")
    torch.set_num_threads(threads)
    steps = [] if args.ops_only else [_steps(p, args.rounds) for p in args.preset or PRESETS]
    path = Path(args.out) if args.out else (
        ROOT / "benchmarks" / "results" / f"fft-conv-{time.strftime('%Y-%m-%d')}.json")
    write_report({"schema": "mamlpp-fft-conv/1", "device": device_info("cpu"),
                  "matmul_one_thread": matmul, "ops_one_thread": ops, "steps": steps}, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
