"""What the non-convolution part of a second-order step could lose, measured: the engine's
max-pool and batch norm against other ways to compute them in torch ops, and against their
memory floor, on one thread at the shapes of the presets' largest NCHW passes.

Issue 20 asks, where a preset cannot reach 2x the reference code, why. `profile_step.py` shows
the convolutions near one core's matmul rate and the rest (batch norm, the max-pool and its
layout copies, fills) as the remaining third of a step. This script asks whether that rest can
be cut with torch's own kernels:

- max-pool forward and backward: the engine's (engine/max_pool.py: pool a channels-last copy,
  int64 indices back in NCHW, torch's NCHW backward), torch's NCHW kernel, a pool from four
  strided slices with one-byte codes (the window's first maximum, as torch picks it) and a
  backward of four strided writes, and the channels-last indices kept with a channels-last
  backward;
- batch-norm forward: torch's native_batch_norm, and the statistics as a matrix-vector
  product and batched dot products (one pass, E[x^2] - E[x]^2) or with a centred second pass;
- batch-norm backward behind the pool: torch's (scatter the pooled gradient, then
  native_batch_norm_backward) and the sums taken on the pooled quarter (the gradient is zero
  elsewhere) with one full-size pass and a scatter-add;
- every op's memory floor: the bytes it must read and write at the copy bandwidth measured in
  the same process (a preallocated copy_).

Each alternative is checked against the engine's result before it is timed (the pool's
values and gradient exactly, batch norm in float64 to 1e-9); best of 5 repeats. And a whole
step with every pass channels-last (`train.channels_last = always`) against the default,
alternating (`--step-rounds`). Writes results/rest-alternatives-DATE.json.

    python benchmarks/rest_alternatives.py [--step-rounds 6]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.op_timing import best_ms  # noqa: E402

# the largest NCHW pass each preset's second-order step pools and normalises (one thread's
# share: omniglot-5w1s folds 4 tasks per task thread)
SHAPES = {
    "omniglot-5w1s": (5, 256, 28, 28),
    "omniglot-5w5s": (25, 64, 28, 28),
    "omniglot-20w5s": (100, 64, 28, 28),
    "miniimagenet (query, stage 1)": (75, 48, 84, 84),
    "miniimagenet (query, stage 2)": (75, 48, 42, 42),
}
_K, _PAD, _DIL = [2, 2], [0, 0], [1, 1]


def _quads(x):
    """The four strided views (top-left, top-right, bottom-left, bottom-right) of x's 2x2
    windows."""
    n, c, h, w = x.shape
    v = x[:, :, : h // 2 * 2, : w // 2 * 2].unflatten(3, (w // 2, 2)).unflatten(2, (h // 2, 2))
    return v[:, :, :, 0, :, 0], v[:, :, :, 0, :, 1], v[:, :, :, 1, :, 0], v[:, :, :, 1, :, 1]


def _slice_pool(x):
    """2x2 max-pool from strided slices; code k = 2 * row + column of the window's first
    maximum in scan order (torch's rule: a later element wins only when strictly greater)."""
    import torch

    tl, tr, bl, br = _quads(x)
    right_top, right_bottom = tr > tl, br > bl
    top, bottom = torch.maximum(tl, tr), torch.maximum(bl, br)
    lower = bottom > top
    codes = torch.where(lower, right_bottom.to(torch.uint8) + 2, right_top.to(torch.uint8))
    return torch.maximum(top, bottom), codes


def _slice_scatter(g, codes, shape):
    import torch

    out = g.new_empty(shape)
    if shape[2] % 2:
        out[:, :, -1].zero_()
    if shape[3] % 2:
        out[:, :, :, -1].zero_()
    for k, quarter in enumerate(_quads(out)):
        torch.mul(g, codes == k, out=quarter)
    return out


def _pool(shape, dtype=None):
    import torch

    from engine import max_pool

    cl = torch.channels_last
    x = torch.randn(shape, dtype=dtype or torch.float32)
    out, indices = max_pool.pool(x, "indices")
    g = torch.randn_like(out)

    def engine_fwd():
        return max_pool.pool(x, "indices")

    def engine_bwd():
        return max_pool.scatter(g, indices, shape, x.dtype)

    def nchw_fwd():
        return torch.ops.aten.max_pool2d_with_indices(x, _K, _K, _PAD, _DIL, False)

    _, slice_codes = _slice_pool(x)
    _, cl_indices = torch.ops.aten.max_pool2d_with_indices(
        x.contiguous(memory_format=cl), _K, _K, _PAD, _DIL, False)
    cl_stand_in = torch.empty(shape, memory_format=cl)

    def cl_kept_fwd():
        o, i = torch.ops.aten.max_pool2d_with_indices(
            x.contiguous(memory_format=cl), _K, _K, _PAD, _DIL, False)
        return o.contiguous(), i

    def cl_kept_bwd():
        return torch.ops.aten.max_pool2d_with_indices_backward(
            g.contiguous(memory_format=cl), cl_stand_in, _K, _K, _PAD, _DIL, False,
            cl_indices).contiguous()

    grad_in = engine_bwd()
    for name, fwd_out, bwd_out in (
            ("nchw", nchw_fwd()[0], None),
            ("slices", _slice_pool(x)[0], _slice_scatter(g, slice_codes, shape)),
            ("cl_kept", cl_kept_fwd()[0], cl_kept_bwd())):
        if not torch.equal(fwd_out, out) or (bwd_out is not None
                                              and not torch.equal(bwd_out, grad_in)):
            raise AssertionError(f"max-pool alternative {name} differs at {shape}")
    return {
        "engine": {"forward_ms": best_ms(engine_fwd), "backward_ms": best_ms(engine_bwd)},
        # its backward is the engine's (the same NCHW kernel)
        "torch_nchw_kernel": {"forward_ms": best_ms(nchw_fwd)},
        "strided_slices": {"forward_ms": best_ms(lambda: _slice_pool(x)),
                           "backward_ms": best_ms(lambda: _slice_scatter(g, slice_codes,
                                                                          shape))},
        "channels_last_indices_kept": {"forward_ms": best_ms(cl_kept_fwd),
                                       "backward_ms": best_ms(cl_kept_bwd)},
    }


def _bn_stats_one_pass(x):
    import torch

    n, c, h, w = x.shape
    m = n * h * w
    mean = (x.view(n, c, h * w) @ x.new_ones(h * w, 1)).sum(0).view(c) / m
    square = torch.bmm(x.view(n * c, 1, h * w), x.view(n * c, h * w, 1)).view(n, c).sum(0) / m
    return mean, square - mean * mean


def _bn_stats_two_pass(x):
    import torch

    n, c, h, w = x.shape
    mean = (x.view(n, c, h * w) @ x.new_ones(h * w, 1)).sum(0).view(c) / (n * h * w)
    d = x - mean.view(1, c, 1, 1)
    var = torch.bmm(d.view(n * c, 1, h * w), d.view(n * c, h * w, 1)).view(n, c).sum(0)
    return mean, var / (n * h * w)


def _bn_forward(stats, x, w, b, eps):
    import torch

    mean, var = stats(x)
    invstd = (var + eps).rsqrt()
    scale = w * invstd
    c = x.shape[1]
    y = torch.addcmul((b - mean * scale).view(1, c, 1, 1), x, scale.view(1, c, 1, 1))
    return y, mean, invstd


def _bn_backward_quarter(g, x, w, mean, invstd, indices):
    """(gx, gw, gb) of batch norm when its output's gradient is the scatter of g to the pool's
    maxima: the sums over the quarter, gx = w s gy + k1 x + k0 in one pass and a scatter-add."""
    import torch

    n, c = x.shape[:2]
    m = x.numel() // c
    flat = indices.reshape(n, c, -1)
    at_max = x.view(n, c, -1).gather(2, flat)
    gv = g.reshape(n, c, -1)
    gb = gv.sum((0, 2))
    gw = ((at_max * gv).sum((0, 2)) - mean * gb) * invstd
    ws = w * invstd
    k1 = -ws * invstd * gw / m
    k0 = -k1 * mean - ws * gb / m
    gx = torch.addcmul(k0.view(1, c, 1, 1), x, k1.view(1, c, 1, 1))
    gx.view(n, c, -1).scatter_add_(2, flat, gv * ws.view(1, c, 1))
    return gx, gw, gb


def _batch_norm(shape):
    import torch

    from engine import max_pool

    eps = 1e-5

    def case(dtype):
        x = torch.randn(shape, dtype=dtype) * 2 + 1
        c = shape[1]
        w, b = torch.rand(c, dtype=dtype) + 0.5, torch.rand(c, dtype=dtype)
        y, mean, invstd = torch.native_batch_norm(x, w, b, None, None, True, 0.0, eps)
        out, indices = max_pool.pool(y, "indices")
        return x, w, b, mean, invstd, torch.randn_like(out), indices

    def torch_backward(g, x, w, mean, invstd, indices):
        gy = max_pool.scatter(g, indices, x.shape, x.dtype)
        return torch.ops.aten.native_batch_norm_backward(
            gy, x, w, None, None, mean, invstd, True, eps, [True, True, True])

    x, w, b, mean, invstd, g, indices = case(torch.float64)
    want = torch.native_batch_norm(x, w, b, None, None, True, 0.0, eps)
    for stats in (_bn_stats_one_pass, _bn_stats_two_pass):
        got = _bn_forward(stats, x, w, b, eps)
        if not all(torch.allclose(a, r, rtol=1e-9, atol=1e-9) for a, r in zip(got, want)):
            raise AssertionError(f"batch-norm forward {stats.__name__} differs at {shape}")
    got = _bn_backward_quarter(g, x, w, mean, invstd, indices)
    if not all(torch.allclose(a, r, rtol=1e-9, atol=1e-9)
               for a, r in zip(got, torch_backward(g, x, w, mean, invstd, indices))):
        raise AssertionError(f"quarter batch-norm backward differs at {shape}")
    x, w, b, mean, invstd, g, indices = case(torch.float32)
    return {
        "forward_ms": {
            "torch_native_batch_norm": best_ms(lambda: torch.native_batch_norm(
                x, w, b, None, None, True, 0.0, eps)),
            "matmul_stats_one_pass": best_ms(lambda: _bn_forward(_bn_stats_one_pass, x, w,
                                                                  b, eps)),
            "matmul_stats_two_pass": best_ms(lambda: _bn_forward(_bn_stats_two_pass, x, w,
                                                                  b, eps)),
        },
        "backward_behind_pool_ms": {
            "torch_scatter_then_native_backward": best_ms(lambda: torch_backward(
                g, x, w, mean, invstd, indices)),
            "sums_on_the_pooled_quarter": best_ms(lambda: _bn_backward_quarter(
                g, x, w, mean, invstd, indices)),
        },
    }


def _floors(shape) -> dict:
    """Copy bandwidth at this size and the fewest bytes each op moves, as milliseconds."""
    import torch

    x = torch.randn(shape)
    out = torch.empty_like(x)
    copy_ms = best_ms(lambda: out.copy_(x))
    full = x.numel() * 4
    per_ms = 2 * full / copy_ms  # bytes per millisecond, read + write
    floor = {  # bytes read and written by a kernel that fuses the op
        # x read, values (a quarter) and one-byte codes written
        "max_pool_forward": full + full / 4 + x.numel() / 4,
        # pooled gradient and codes read, full-size gradient written
        "max_pool_backward": full / 4 + x.numel() / 4 + full,
        # statistics (one read), then x read and y written
        "batch_norm_forward": 3 * full,
        # x read for the sums, then x read and the gradient written (pooled terms a quarter)
        "batch_norm_backward_behind_pool": 3 * full + full / 2,
    }
    return {"copy_ms": copy_ms, "copy_gb_per_s": round(per_ms / 1e6, 2),
            "floor_ms": {k: round(v / per_ms, 3) for k, v in floor.items()}}


def _step_layout(rounds: int) -> dict:
    """omniglot-5w1s second-order steps, default against every pass channels-last."""
    from benchmarks.alternating import alternate, median_speedup
    from engine.bench import _update, synthetic_dataset
    from engine.config import resolve
    from engine.data.sampler import sampler_for
    from engine.learner import MetaLearner
    from engine.msl import msl_weights

    cfg = resolve("omniglot-5w1s")
    t = cfg.train
    weights = msl_weights(0, t.inner_steps, cfg.maml_pp.msl_epochs, cfg.maml_pp.msl)
    sampler = sampler_for(cfg, "train", synthetic_dataset(cfg))
    learners = {"default": MetaLearner(cfg, "cpu"), "channels_last": MetaLearner(cfg, "cpu")}
    learners["channels_last"].paths = replace(learners["channels_last"].paths,
                                              channels_last="always")

    def step(name, batch):
        _update(learners[name], batch, weights, True)

    seconds = alternate(step, list(learners), sampler, t.meta_batch, rounds)
    ratio = median_speedup(seconds, "default", "channels_last")
    print(f"omniglot-5w1s second order, every pass channels-last: {ratio:.3f}x "
          f"(median {statistics.median(seconds['channels_last']):.3f} vs "
          f"{statistics.median(seconds['default']):.3f} s)", flush=True)
    return {"preset": "omniglot-5w1s", "order": "second", "msl_phase": True,
            "paths": {k: v.paths.to_dict() for k, v in learners.items()},
            "seconds": seconds, "speedup_median_ratio": ratio}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step-rounds", type=int, default=6,
                        help="alternating rounds of the whole-step layout comparison (0: skip)")
    parser.add_argument("--out", default=None,
                        help="result file (default results/rest-alternatives-DATE.json)")
    args = parser.parse_args()
    import torch

    from engine.allocator import retain_freed_memory
    from engine.bench import device_info, write_report

    retain_freed_memory()  # as a training process does: no page faults on reused memory
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ops = {}
    for label, shape in SHAPES.items():
        ops[label] = {"shape": list(shape), "memory": _floors(shape),
                      "max_pool": _pool(shape), "batch_norm": _batch_norm(shape)}
        m, p, bn = ops[label]["memory"], ops[label]["max_pool"], ops[label]["batch_norm"]
        print(f"{label} {list(shape)}: copy {m['copy_gb_per_s']} GB/s; pool fwd+bwd engine "
              f"{p['engine']['forward_ms'] + p['engine']['backward_ms']:.2f} ms, slices "
              f"{p['strided_slices']['forward_ms'] + p['strided_slices']['backward_ms']:.2f}, "
              f"floor {m['floor_ms']['max_pool_forward'] + m['floor_ms']['max_pool_backward']:.2f}"
              f"; bn fwd torch {bn['forward_ms']['torch_native_batch_norm']} ms, one pass "
              f"{bn['forward_ms']['matmul_stats_one_pass']}, floor "
              f"{m['floor_ms']['batch_norm_forward']}; bn bwd torch "
              f"{bn['backward_behind_pool_ms']['torch_scatter_then_native_backward']} ms, "
              f"quarter {bn['backward_behind_pool_ms']['sums_on_the_pooled_quarter']}, floor "
              f"{m['floor_ms']['batch_norm_backward_behind_pool']}", flush=True)
    torch.set_num_threads(threads)
    report = {"schema": "mamlpp-rest-alternatives/1", "device": device_info("cpu"),
              "threads": 1, "ops": ops}
    if args.step_rounds:
        report["step_layout"] = _step_layout(args.step_rounds)
    path = Path(args.out) if args.out else (
        ROOT / "benchmarks" / "results" / f"rest-alternatives-{time.strftime('%Y-%m-%d')}.json")
    write_report(report, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
