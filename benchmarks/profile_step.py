"""Where a second-order meta-update's time goes, per preset: torch.profiler's self CPU time of
one step on one thread (the default path otherwise: tasks folded where the engine folds them),
grouped by kind of op, with the convolutions' rate from their FLOPs (torch's FlopCounter, tasks
counted unfolded, engine/bench.py) over their time.

This is issue 20's "profile of what remains": next to the roofline (`speed_table.py`) it shows
how much of a step is convolution arithmetic already near one core's matmul rate, and how much
is the rest (batch norm, pooling, copies, element-wise work) that a faster engine could cut.
Synthetic images of each preset's shape; MSL phase (every step's loss). Writes
results/profile-step-DATE.json.

    python benchmarks/profile_step.py --preset omniglot-5w1s --preset omniglot-20w1s
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAPER_PRESETS = ["omniglot-5w1s", "omniglot-5w5s", "omniglot-20w1s", "omniglot-20w5s",
                 "miniimagenet-5w1s", "miniimagenet-5w5s"]
# op name fragments -> kind, first match wins (aten names as the profiler reports them)
KINDS = [
    ("convolution", ("convolution", "conv2d", "mkldnn_conv", "_slow_conv", "thnn_conv")),
    ("matmul (first conv, classifier)", ("aten::mm", "aten::bmm", "aten::addmm", "matmul",
                                         "aten::linear", "im2col", "unfold")),
    ("batch norm", ("batch_norm", "BatchNorm")),
    ("max-pool", ("max_pool", "scatter", "gather")),
    ("copies and layout", ("copy_", "clone", "contiguous", "_to_copy", "aten::to", "aten::cat",
                           "aten::stack", "repeat", "index", "aten::t", "transpose",
                           "permute", "view", "reshape", "expand", "slice", "select")),
    ("fills and allocation", ("empty", "zeros", "ones", "fill_", "zero_", "resize_", "full")),
    ("optimizer (Adam)", ("_foreach", "adam")),
]
OTHER = "element-wise and reductions"
# engine/batch_norm.py's autograd functions by exact name: with train.fused_kernels their own
# time is engine/fused_cpu.py's compiled batch norm + max-pool (forward) and the batch-norm
# backward behind the pool; their backward nodes (the second derivative) are batch norm
COMPILED = {"_BatchNormPool": "batch norm + max-pool (compiled)",
            "_BatchNormBackward": "batch norm + max-pool (compiled)"}


def kind_of(name: str) -> str:
    if name in COMPILED:
        return COMPILED[name]
    for kind, fragments in KINDS:
        if any(f in name for f in fragments):
            return kind
    return OTHER


def self_us_by_op(prof) -> dict[str, float]:
    """torch.profiler's self CPU time (microseconds) per op name."""
    by_op: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        by_op[event.key] += event.self_cpu_time_total
    return by_op


def by_kind(by_op: dict[str, float]) -> dict[str, float]:
    """Those times summed per kind of op (`kind_of`)."""
    kinds: dict[str, float] = defaultdict(float)
    for name, us in by_op.items():
        kinds[kind_of(name)] += us
    return kinds


def _conv_flops(name: str, shapes: list, args: list) -> int:
    """Multiply-adds x 2 of one convolution call from its recorded input shapes and arguments
    (a backward counts one forward's worth per gradient it computes)."""
    if name == "aten::convolution_backward":  # (grad_out, input, weight, ..., output_mask)
        (n, o, ho, wo), w = shapes[0], shapes[2]
        return 2 * n * o * ho * wo * w[1] * w[2] * w[3] * sum(bool(m) for m in args[10][:2])
    (n, c, h, wi), w = shapes[0], shapes[1]
    if name == "aten::_convolution":  # transposed: every input value meets O/g x kh x kw
        return 2 * n * c * h * wi * w[1] * w[2] * w[3]
    padding, stride, dilation = args[3], args[4], args[5]  # mkldnn_convolution
    ho = (h + 2 * padding[0] - dilation[0] * (w[2] - 1) - 1) // stride[0] + 1
    wo = (wi + 2 * padding[1] - dilation[1] * (w[3] - 1) - 1) // stride[1] + 1
    return 2 * n * w[0] * ho * wo * w[1] * w[2] * w[3]


def conv_calls(prof, steps: int, total_us: float, top: int = 12) -> list[dict]:
    """The convolution calls that take most self time, by op and input shapes: calls per step,
    share of the profile's self time `total_us` and GFLOP/s. aten::_convolution counts only
    transposed (its oneDNN deconvolution runs inside it, not as an op of its own)."""
    calls: dict = defaultdict(lambda: [0, 0.0, 0])
    for e in prof.events():
        args = list(getattr(e, "concrete_inputs", []) or [])
        if e.name not in ("aten::mkldnn_convolution", "aten::convolution_backward",
                          "aten::_convolution"):
            continue
        if e.name == "aten::_convolution" and not (len(args) > 6 and args[6] is True):
            continue
        shapes = [list(s) for s in e.input_shapes]
        c = calls[(e.name, str(shapes[:3]))]
        c[0] += 1
        c[1] += e.self_cpu_time_total
        c[2] += _conv_flops(e.name, shapes, args)
    rows = sorted(calls.items(), key=lambda kv: -kv[1][1])[:top]
    return [{"op": op, "input_shapes": shapes, "calls_per_step": n // steps,
             "share": round(us / total_us, 4), "gflop_per_s": round(flops / us / 1e3, 1)}
            for (op, shapes), (n, us, flops) in rows]


def one_thread_learner(preset: str):
    """(learner, sampler of synthetic tasks, MSL-phase loss weights): the preset's default path
    with one task thread (tasks still folded where the engine folds them)."""
    from engine.bench import synthetic_dataset
    from engine.config import resolve
    from engine.data.sampler import sampler_for
    from engine.learner import MetaLearner
    from engine.msl import msl_weights

    cfg = resolve(preset)
    t = cfg.train
    weights = msl_weights(0, t.inner_steps, cfg.maml_pp.msl_epochs, cfg.maml_pp.msl)
    sampler = sampler_for(cfg, "train", synthetic_dataset(cfg))
    learner = MetaLearner(cfg, "cpu")
    learner.paths = replace(learner.paths, task_threads=1, task_threads_second_order=1)
    return learner, sampler, weights


def _profile(preset: str, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    from engine.bench import _counted_path, _update

    learner, sampler, weights = one_thread_learner(preset)
    t = learner.config.train
    batches = [sampler.batch(i * t.meta_batch, t.meta_batch) for i in range(steps + 1)]
    _update(learner, batches[0], weights, True)  # warm-up: allocator, first-call setup
    counter = FlopCounterMode(display=False)
    with _counted_path(learner), counter:  # tasks counted unfolded (engine/bench.py)
        _update(learner, batches[0], weights, True)
    by_op = counter.get_flop_counts().get("Global", {})
    conv_flops = sum(int(v) for k, v in by_op.items() if "convolution" in str(k))
    total_flops = sum(int(v) for v in by_op.values())
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for batch in batches[1:]:
            _update(learner, batch, weights, True)
    wall = (time.perf_counter() - start) / steps
    self_us = self_us_by_op(prof)
    total_us = sum(self_us.values())
    kinds = by_kind(self_us)
    conv_s = kinds["convolution"] / 1e6 / steps
    top = sorted(self_us.items(), key=lambda kv: -kv[1])[:15]
    result = {
        "preset": preset, "order": "second", "msl_phase": True, "steps_profiled": steps,
        "task_group": learner.paths.task_group, "threads": 1,
        "step_s_under_profiler": round(wall, 4),
        "gflop_per_step": round(total_flops / 1e9, 2),
        "conv_gflop_per_step": round(conv_flops / 1e9, 2),
        "conv_gflop_per_s": round(conv_flops / 1e9 / conv_s, 1) if conv_s else None,
        "share_by_kind": {k: round(v / total_us, 4)
                          for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top_ops": [{"op": k, "share": round(v / total_us, 4)} for k, v in top],
        "conv_calls": conv_calls(prof, steps, total_us),
    }
    shares = ", ".join(f"{k} {v:.0%}" for k, v in result["share_by_kind"].items())
    print(f"{preset}: {wall:.2f} s/step on one thread (profiled), convolutions "
          f"{result['conv_gflop_per_s']} GFLOP/s; {shares}", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", action="append", default=None,
                        help="repeatable; default: the six paper presets")
    parser.add_argument("--steps", type=int, default=2, help="steps profiled per preset")
    parser.add_argument("--out", default=None,
                        help="result file (default results/profile-step-DATE.json)")
    args = parser.parse_args()
    import torch

    from engine.bench import device_info, matmul_throughput, write_report

    torch.set_num_threads(1)
    runs = [_profile(p, args.steps) for p in args.preset or PAPER_PRESETS]
    path = Path(args.out) if args.out else (
        ROOT / "benchmarks" / "results" / f"profile-step-{time.strftime('%Y-%m-%d')}.json")
    report = {"schema": "mamlpp-profile-step/1", "device": device_info("cpu"),
              "matmul_one_thread": matmul_throughput("cpu"), "runs": runs}
    write_report(report, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
