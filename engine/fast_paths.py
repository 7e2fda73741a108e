"""Which fast path the engine takes on a device: every `auto` of the [train] speed keys resolved.

The choices come from measurements, not assumptions: benchmarks/README.md ("Measurements behind
the engine's defaults") has the numbers, benchmarks/results/ the reports.

- impl: the per-task loop on CPU; vmapped tasks on CUDA (one launch per op for the whole
  meta-batch; on CPU vmap turns convs into grouped convs, slower and several times the memory).
- task_threads: on CPU, one thread per core, each running whole tasks with single-threaded ops
  (few-shot ops are too small for intra-op threads to pay, see engine/task_threads.py); 1 on CUDA.
  Second-order training holds one task's whole graph per thread, so there auto uses several
  threads only for small images (<= SMALL_IMAGE px) and while their estimated graphs fit
  SECOND_ORDER_BUDGET: for large images a second thread was no faster and held GiBs more.
- task_group: tasks folded into one pass's channels in training steps (engine/grouped.py), on
  CPU where a task's tensors are small (first-stage activations up to FOLD_MAX_ELEMENTS, i.e.
  Omniglot 5-way 1-shot): there each op's fixed cost outweighs its arithmetic, and folding the
  tasks a thread adapts into one pass measured 1.37x faster second-order steps and 1.28x
  first-order ones; larger tasks gained 5-10% for four times the second-order graphs. Auto
  folds the meta-batch's share of one auto task thread, so it depends on the core count, never
  on an explicit train.task_threads. Evaluation adapts one task per pass (engine/adapt.py
  promises a task the same logits in any batch).
- channels_last: on CPU, passes that do not take the compiled kernels and NNPACK's
  convolutions run channels-last, where torch's ops are faster (its NCHW max-pool is much
  slower than its channels-last one on the CPU). Tasks larger than FOLD_MAX_ELEMENTS, with
  fused_kernels and fft_conv both on, run their passes NCHW through them (but for the
  second-order queries below): first-order steps measured 1.16-1.25x faster than channels-last
  on mini-ImageNet and Omniglot 20-way 5-shot, evaluation 1.13-1.22x, the other Omniglot
  presets 0.98-1.08x (benchmarks/first_order_layout.py; either piece alone was no faster than
  channels-last). Small tasks (the folded ones) keep channels-last in first-order steps and
  evaluation (NCHW evaluated 0.7x there). Second-order support passes are NCHW: channels-last
  was slower or no faster there (NCHW max-pool goes through a channels-last copy,
  engine/max_pool.py). Their query passes go channels-last only for small images on several
  task threads, the one case where it paid. Off on CUDA until measured there (run_gpu.sh does).
- shared_arena: on CPU for images over SMALL_IMAGE px: task threads then reuse the training
  heap instead of each keeping an arena of its own (engine/allocator.py).
- fused_kernels: on CPU, batch norm and the max-pool of float32 NCHW passes as the
  compiled kernels of engine/fused_cpu.py where a C compiler can build them (second-order
  steps: the support passes and, on mini-ImageNet and one task per thread, the query passes).
  Their forward was 4-7x and backward 1.5-2.8x faster than torch's ops; second-order steps
  1.09-1.23x faster on mini-ImageNet, 1.00-1.07x on Omniglot (benchmarks/fused_kernels.py);
  compiling the backward's own derivative too made them 1.04-1.11x faster again (`--second`).
  Also in first-order steps and evaluation where those are NCHW (channels_last above).
- fft_conv: on CPU (per-task loop), the 3x3 convolutions of float32 NCHW passes that
  engine/fft_conv.py takes (NNPACK's 16x16 Fourier transform: Omniglot's 14x14 second stage,
  mini-ImageNet's 42x42 one) and their derivatives; there a convolution's second-order pass
  measured 1.6-1.8x (14x14) and 1.5x (42x42) faster than oneDNN's, whole second-order
  steps 1.05-1.28x (benchmarks/fft_conv.py). Where NNPACK would take its 8x8 Winograd
  transform instead (7, 10, 21 pixels a side), whose float32 error was 5-15x oneDNN's, and
  for one- and three-channel images, it stays oneDNN's.
- precision: float32 on CPU (bf16 autocast wrecked second-order gradients there); on CUDA "tf32"
  (TF32 convs are torch's own default; this extends it to matmuls) until run_gpu.sh says more.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass

import torch

from engine.config import Config
from engine.fused_cpu import toolchain
from engine.task_threads import auto_workers

# Bytes of second-order graphs that auto task threads may hold at once, and the size of one,
# estimated from the first stage's activations: about 12 tensors of [support images, filters,
# H, W] float32 per inner step (fitted to measured graphs, benchmarks/README.md).
SECOND_ORDER_BUDGET = 2 << 30
SMALL_IMAGE = 32  # pixels a side up to which second-order steps use task threads
# first-stage activation elements of a task's support set up to which CPU training folds tasks
FOLD_MAX_ELEMENTS = 2**18
_SAVED_PER_STEP = 12


def first_stage_elements(config: Config) -> int:
    _, size, _ = config.image_shape
    return config.data.ways * config.data.shots * config.model.filters * size * size


def second_order_task_bytes(config: Config) -> int:
    return first_stage_elements(config) * 4 * _SAVED_PER_STEP * config.train.inner_steps


@dataclass(frozen=True)
class FastPaths:
    impl: str  # loop | vmap | reference
    task_threads: int
    task_threads_second_order: int
    channels_last: str  # never | first_order | always
    query_channels_last_second_order: bool  # auto on CPU, small images
    precision: str  # float32 | tf32 | bf16
    shared_arena: bool = False  # CPU threads share glibc's main arena (engine/allocator.py)
    task_group: int = 1  # tasks folded into one pass in training steps (engine/grouped.py)
    fused_kernels: bool = False  # engine/fused_cpu.py in training passes it takes
    fft_conv: bool = False  # engine/fft_conv.py's convolutions in training passes it takes

    def to_dict(self) -> dict:
        return asdict(self)

    def layout_for(self, second_order: bool) -> tuple[bool, bool]:
        """Whether a step of this derivative order lays its (support, query) images out
        channels-last."""
        if self.channels_last == "always" or (self.channels_last == "first_order"
                                              and not second_order):
            return True, True
        return False, self.query_channels_last_second_order and second_order

    def autocast(self, device: torch.device) -> AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return nullcontext()

    def apply_global(self, device: torch.device) -> None:
        """TF32 is a process-wide torch switch; set it to what this run asked for."""
        if device.type == "cuda":
            tf32 = self.precision == "tf32"
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32


def resolve_impl(impl: str, device: torch.device) -> str:
    if impl != "auto":
        return impl
    return "vmap" if device.type == "cuda" else "loop"


def fast_paths(config: Config, device: torch.device, kernels_built: bool = True,
               nnpack: bool = True) -> FastPaths:
    """The resolved paths; `kernels_built` / `nnpack` False: engine/fused_cpu.py's kernels did
    not build / torch has no NNPACK, so auto does without them (and lays passes out for that)."""
    t = config.train
    if t.impl == "reference":  # the plain definition: one task at a time, NCHW, float32
        precision = t.precision if t.precision != "auto" else "float32"
        return FastPaths("reference", 1, 1, "never", False, precision, task_group=1)
    cpu = device.type == "cpu"
    precision = t.precision if t.precision != "auto" else ("float32" if cpu else "tf32")
    fits = SECOND_ORDER_BUDGET // max(1, second_order_task_bytes(config))
    small = config.image_shape[1] <= SMALL_IMAGE
    workers = auto_workers(device)
    auto_second = max(1, min(workers, fits)) if small else 1
    threads = t.task_threads or workers
    second = t.task_threads or auto_second
    impl = resolve_impl(t.impl, device)
    loop = cpu and impl == "loop"
    fused = t.fused_kernels == "on" or (t.fused_kernels == "auto" and loop and kernels_built
                                        and toolchain() is None)
    fft = t.fft_conv == "on" or (t.fft_conv == "auto" and loop and nnpack)
    large = first_stage_elements(config) > FOLD_MAX_ELEMENTS
    layout = t.channels_last if t.channels_last != "auto" else (
        "never" if not cpu or (fused and fft and large) else "first_order")
    return FastPaths(
        impl=impl,
        task_threads=threads,
        task_threads_second_order=second,
        channels_last=layout,
        # decided by the auto thread count, not an explicit one, so that results never
        # depend on train.task_threads
        query_channels_last_second_order=(t.channels_last == "auto" and cpu
                                          and auto_second > 1),
        precision=precision,
        shared_arena=cpu and not small,
        task_group=t.task_group or (_auto_group(config, workers, fits // auto_second)
                                    if loop else 1),
        fused_kernels=fused,
        fft_conv=fft,
    )


def _auto_group(config: Config, workers: int, graphs_per_thread: int) -> int:
    """One auto task thread's share of the meta-batch, for tasks small enough to gain; at
    most as many second-order graphs as the budget allows a thread."""
    if first_stage_elements(config) > FOLD_MAX_ELEMENTS:
        return 1
    share = -(-config.train.meta_batch // max(1, workers))
    return max(1, min(share, graphs_per_thread))
