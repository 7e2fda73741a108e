"""The compiled CPU kernels (engine/fused_cpu.py: batch norm fused with the max-pool after it)
against torch's ops, one op at a time on one thread and in whole second-order steps.

Issue 20's remaining gap is the memory-bound rest of a step (`rest_alternatives.py`: torch's
batch norm and max-pool run 2.5-6x their memory floor and no formulation in torch ops is
faster). This measures what the fused kernels gain: per op at the presets' largest NCHW shapes
(checked against torch's first), and per step with `train.fused_kernels` off and on, alternating
on the same meta-batches, on each preset given; and, on the process's intra-op threads, one
call against the same call with its channels split across them. Needs a C compiler. Writes
results/fused-kernels-DATE.json.

`--second` measures the compiled second derivative instead (engine/batch_norm.py's
`_BatchNormBackward.backward`, the derivative of the fused backward that second-order MAML
takes): per op against the same closed form in torch's ops, and per step with the kernels on
and the second derivative compiled or in torch's ops, alternating. Writes
results/fused-second-derivative-DATE.json.

    python benchmarks/fused_kernels.py [--preset miniimagenet-5w1s ...] [--rounds 4] [--second]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.op_timing import best_ms  # noqa: E402

SHAPES = [(5, 256, 28, 28), (25, 64, 28, 28), (100, 64, 28, 28), (75, 48, 84, 84),
          (75, 48, 42, 42)]
EPS = 1e-5


def build():
    from engine import fused_cpu

    fused_cpu.load(required=True)
    return fused_cpu


def _ops(kernels) -> list[dict]:
    from engine.batch_norm import _BatchNormBackward, _BatchNormPool

    def engine_forward(x, w, b):
        return _BatchNormPool.forward(x, w, b, EPS)

    rows = []
    for shape in SHAPES:
        rows.append(_op_row(kernels, shape, engine_forward, _BatchNormBackward.forward))
        f, bk = rows[-1]["forward_ms"], rows[-1]["backward_ms"]
        print(f"{list(shape)}: forward {f['engine']} -> {f['fused']} ms, backward "
              f"{bk['engine']} -> {bk['fused']} ms", flush=True)
    return rows


def _op_row(kernels, shape, engine_forward, engine_backward) -> dict:
    import torch

    x = torch.randn(shape) * 2 + 1
    w, b = torch.rand(shape[1]) + 0.5, torch.rand(shape[1])
    want = engine_forward(x, w, b)
    got = kernels.forward(x, w, b, EPS)
    codes_differ = (want[3] != got[3]).float().mean().item()
    assert torch.allclose(got[0], want[0], rtol=1e-5, atol=1e-5) and codes_differ < 1e-4
    args = (torch.randn_like(want[0]), x, w, want[1], want[2], want[3])
    for a, r in zip(kernels.backward(*args), engine_backward(*args[:5], EPS, want[3])):
        assert torch.allclose(a, r, rtol=1e-4, atol=1e-4 * r.abs().max().item())
    return {"shape": list(shape), "codes_differing": codes_differ,
            "forward_ms": {"engine": best_ms(lambda: engine_forward(x, w, b), warmup=1),
                           "fused": best_ms(lambda: kernels.forward(x, w, b, EPS), warmup=1)},
            "backward_ms": {"engine": best_ms(lambda: engine_backward(*args[:5], EPS, want[3]),
                                              warmup=1),
                            "fused": best_ms(lambda: kernels.backward(*args), warmup=1)}}


def _second_ops(kernels) -> list[dict]:
    """The second derivative of the fused backward along a random ggx, at each shape on one
    thread: compiled against torch's ops (checked against each other first)."""
    rows = []
    for shape in SHAPES:
        rows.append(_second_row(kernels, shape))
        times = rows[-1]["second_derivative_ms"]
        print(f"{list(shape)}: second derivative {times['torch_ops']} -> {times['compiled']} ms",
              flush=True)
    return rows


def _kernel_inputs(kernels, shape):
    """Random batch-norm input, weight and bias of a shape, the kernels' forward statistics
    and codes, and a random gradient of the pooled output."""
    import torch

    x = torch.randn(shape) * 2 + 1
    w, b = torch.rand(shape[1]) + 0.5, torch.rand(shape[1])
    _, mean, invstd, codes = kernels.forward(x, w, b, EPS)
    return x, w, b, mean, invstd, codes, torch.randn(codes.shape)


def _second_row(kernels, shape) -> dict:
    import torch

    from engine import batch_norm

    x, w, _, mean, invstd, codes, g = _kernel_inputs(kernels, shape)
    g.requires_grad_()
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    gx, _, _ = batch_norm._BatchNormBackward.apply(g, xg, wg, mean, invstd, EPS, codes, True)
    ggx = torch.randn(shape)

    def second():
        return torch.autograd.grad(gx, (g, xg, wg), ggx, retain_graph=True)

    times, results = {}, {}
    for name, flag in (("torch_ops", False), ("compiled", True)):
        batch_norm.COMPILED_SECOND_DERIVATIVE = flag
        try:
            results[name] = second()
            times[name] = best_ms(second, warmup=1)
        finally:
            batch_norm.COMPILED_SECOND_DERIVATIVE = True
    for a, r in zip(results["compiled"], results["torch_ops"]):
        assert torch.allclose(a, r, rtol=1e-4, atol=1e-4 * r.abs().max().item())
    return {"shape": list(shape), "second_derivative_ms": times}


def _split_ops(kernels) -> list[dict]:
    """One call on one thread against the same call split over the calling thread's intra-op
    threads (engine/fused_cpu.py's `_over_channels`), at the shapes that split."""
    import torch

    rows = []
    for shape in SHAPES:
        if torch.Size(shape).numel() >= kernels.PARALLEL_MIN_ELEMENTS:
            rows.append(_split_row(kernels, shape))
            f, bk = rows[-1]["forward_ms"], rows[-1]["backward_ms"]
            print(f"{list(shape)} on {rows[-1]['threads']} threads: forward {f['one_call']} -> "
                  f"{f['split']} ms, backward {bk['one_call']} -> {bk['split']} ms split",
                  flush=True)
    return rows


def _split_row(kernels, shape) -> dict:
    import torch

    x, w, b, mean, invstd, codes, g = _kernel_inputs(kernels, shape)
    row = {"shape": list(shape), "threads": torch.get_num_threads(),
           "forward_ms": {}, "backward_ms": {}}
    default = kernels.PARALLEL_MIN_ELEMENTS
    try:
        for name, limit in (("one_call", 1 << 62), ("split", default)):
            kernels.PARALLEL_MIN_ELEMENTS = limit
            row["forward_ms"][name] = best_ms(lambda: kernels.forward(x, w, b, EPS), warmup=1)
            row["backward_ms"][name] = best_ms(
                lambda: kernels.backward(g, x, w, mean, invstd, codes), warmup=1)
    finally:
        kernels.PARALLEL_MIN_ELEMENTS = default
    return row


def _steps(preset: str, rounds: int, second: bool = False) -> dict:
    """Second-order steps alternating between kernels off and on, or (`second`) with the
    kernels on and the second derivative in torch's ops or compiled."""
    from contextlib import contextmanager

    from benchmarks.alternating import alternating_steps
    from engine import batch_norm

    if not second:
        return alternating_steps(
            preset, {k: [f"train.fused_kernels={k}"] for k in ("off", "on")}, rounds)

    @contextmanager
    def second_derivative(name):
        batch_norm.COMPILED_SECOND_DERIVATIVE = name != "torch_ops"
        try:
            yield
        finally:
            batch_norm.COMPILED_SECOND_DERIVATIVE = True

    return alternating_steps(preset, {k: ["train.fused_kernels=on"]
                                      for k in ("torch_ops", "compiled")}, rounds,
                             second_derivative)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", action="append", default=None)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", default=None)
    parser.add_argument("--ops-only", action="store_true", help="skip the whole steps")
    parser.add_argument("--second", action="store_true",
                        help="the compiled second derivative against torch's ops")
    args = parser.parse_args()
    import torch

    from engine.allocator import retain_freed_memory
    from engine.bench import device_info, write_report

    retain_freed_memory()
    kernels = build()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ops = _second_ops(kernels) if args.second else _ops(kernels)
    torch.set_num_threads(threads)
    split = [] if args.second else _split_ops(kernels)
    steps = [] if args.ops_only else [
        _steps(p, args.rounds, args.second)
        for p in args.preset or ["omniglot-5w1s", "miniimagenet-5w1s", "miniimagenet-5w5s"]]
    name = "fused-second-derivative" if args.second else "fused-kernels"
    path = Path(args.out) if args.out else (
        ROOT / "benchmarks" / "results" / f"{name}-{time.strftime('%Y-%m-%d')}.json")
    write_report({"schema": "mamlpp-fused-kernels/1", "device": device_info("cpu"),
                  "ops_one_thread": ops, "ops_split": split, "steps": steps}, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
