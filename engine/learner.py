"""MetaLearner: the public face of the engine.

    learner = MetaLearner(config)
    metrics = learner.train_step(batch, epoch)      # one meta-update (outer_step)
    result = learner.evaluate(batch)                # adaptation only, no meta-update
    tensors = learner.state_tensors()               # everything a checkpoint needs
    learner.load_state_tensors(tensors)

A training step reads like the paper: the epoch fixes the MSL weights, the derivative order and
the meta learning rate; `meta_loss` runs every task's inner loop and backpropagates the weighted
query losses; `outer_step` clamps, checks and applies one Adam update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine import fft_conv, fused_cpu
from engine.allocator import retain_freed_memory
from engine.bn_running import fold_meta_batch, init_running_stats
from engine.config import Config
from engine.distributed import SINGLE, World, all_gather_rows, all_reduce_sum
from engine.errors import UserError
from engine.fast_paths import fast_paths
from engine.inner_loop import InnerPlan
from engine.meta_batch import BatchResult, MetaParams, meta_batch
from engine.model import NetSpec, init_adapted, init_bn
from engine.msl import msl_weights
from engine.schedule import meta_lr, second_order_at
from engine.tasks import TaskBatch


class NonFiniteLossError(RuntimeError):
    """The meta-loss was NaN or infinite; no update was applied."""


@dataclass
class StepMetrics:
    loss: float  # weighted multi-step meta-loss, mean over tasks
    accuracy: float  # final-step query accuracy, mean over tasks
    step_losses: list[float | None]  # mean query loss per inner step (None: not computed)
    msl_weights: list[float]
    meta_lr: float
    second_order: bool


@dataclass
class EvalResult:
    logits: torch.Tensor  # [B, ways*queries, ways] final-step query logits
    accuracy: torch.Tensor  # [B]
    loss: torch.Tensor  # [B]


def _unflatten(row: torch.Tensor, shapes) -> list:
    out, offset = [], 0
    for fwd in shapes:
        stages = []
        for m_shape, v_shape in fwd:
            m = row[offset:offset + m_shape.numel()].view(m_shape)
            offset += m_shape.numel()
            v = row[offset:offset + v_shape.numel()].view(v_shape)
            offset += v_shape.numel()
            stages.append((m, v))
        out.append(stages)
    return out


class MetaLearner:
    def __init__(self, config: Config, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, world: World = SINGLE) -> None:
        self.config = config
        self.world = world
        self.device = torch.device(device)
        self.dtype = dtype
        self.spec = NetSpec.from_config(config)
        self.paths = fast_paths(config, self.device)
        built = (not self.paths.fused_kernels
                 or fused_cpu.load(config.train.fused_kernels == "on") is not None)
        nnpack = not self.paths.fft_conv or fft_conv.supported()
        if not nnpack and config.train.fft_conv == "on":
            raise UserError("train.fft_conv = on, but this torch has no NNPACK for this CPU; "
                            "set train.fft_conv = auto or off.")
        if not (built and nnpack):  # auto, and the kernels' build failed or NNPACK is missing
            self.paths = fast_paths(config, self.device, kernels_built=built, nnpack=nnpack)
        self.paths.apply_global(self.device)
        self.impl = self.paths.impl
        if self.device.type == "cpu":
            retain_freed_memory(shared_arena=self.paths.shared_arena)
        t, p = config.train, config.maml_pp
        generator = torch.Generator().manual_seed(t.seed)

        def place(params: dict[str, torch.Tensor], learn: bool) -> dict[str, torch.Tensor]:
            return {k: v.to(self.device, dtype).requires_grad_(learn) for k, v in params.items()}

        self.meta = MetaParams(
            adapted=place(init_adapted(self.spec, generator), True),
            bn=place(init_bn(self.spec), True),
            lrs=place({k: torch.full((t.inner_steps,), t.inner_lr)
                       for k in self.spec.adapted_names}, p.lslr),
            running=place(init_running_stats(self.spec.stages, self.spec.stat_rows,
                                             self.spec.filters), False),
        )
        self.optimizer = torch.optim.Adam(self.meta_parameters(), lr=t.meta_lr)

    def named_meta_parameters(self) -> list[tuple[str, torch.Tensor]]:
        named = [(f"net.{k}", v) for k, v in self.meta.adapted.items()]
        named += [(f"bn.{k}", v) for k, v in self.meta.bn.items()]
        if self.config.maml_pp.lslr:
            named += [(f"lslr.{k}", v) for k, v in self.meta.lrs.items()]
        return named

    def meta_parameters(self) -> list[torch.Tensor]:
        return [v for _, v in self.named_meta_parameters()]

    # ---- training -------------------------------------------------------------------------

    def train_step(self, batch: TaskBatch, epoch: int) -> StepMetrics:
        """One meta-update on a meta-batch of tasks."""
        weights = msl_weights(epoch, self.config.train.inner_steps, self.config.maml_pp.msl_epochs,
                              self.config.maml_pp.msl)
        return self.update(batch, weights, second_order_at(epoch, self.config),
                           meta_lr(epoch, self.config))

    def update(self, batch: TaskBatch, weights: list[float], second_order: bool,
               lr: float) -> StepMetrics:
        """One meta-update with the schedule's values given: what `train_step` runs, and what
        `mamlpp bench` times (so it holds exactly the tensors training holds; a result kept
        past its step pinned small tensors all over the heap and grew the bench's RSS)."""
        result, loss = self.meta_loss(batch, weights, second_order)
        self.outer_step(loss, lr)
        step_losses: list[float | None] = [None] * len(weights)
        plan_steps = [i for i, w in enumerate(weights) if w > 0]
        for j, i in enumerate(plan_steps):
            step_losses[i] = result.losses[:, j].mean().item()
        return StepMetrics(loss, result.accuracy.mean().item(), step_losses, weights, lr,
                           second_order)

    def meta_loss(self, batch: TaskBatch, weights: list[float],
                  second_order: bool) -> tuple[BatchResult, float]:
        """Weighted multi-step query loss, backpropagated into the meta-parameters' grads.

        Under torch.distributed `batch` is this rank's share of the meta-batch; gradients,
        per-task losses, accuracies and BN statistics come back summed/gathered over ranks, so
        every rank holds the whole meta-batch's results."""
        loss_steps = tuple(i for i, w in enumerate(weights) if w > 0)
        plan = InnerPlan(self.config.train.inner_steps, loss_steps, second_order, track_stats=True,
                         fused=self.paths.fused_kernels, fft_conv=self.paths.fft_conv)
        w = torch.tensor([weights[i] for i in loss_steps], device=self.device, dtype=self.dtype)
        self.optimizer.zero_grad(set_to_none=True)
        batch = self._place(batch, second_order)
        total = batch.size * self.world.size
        with self.paths.autocast(self.device):
            result = meta_batch(self.meta, batch, plan, w, self.impl,
                                self.config.train.chunk_size, denominator=total,
                                workers=(self.paths.task_threads_second_order if second_order
                                         else self.paths.task_threads),
                                group=self.paths.task_group)
        result.accuracy = (result.logits.argmax(-1) == batch.y_query).to(self.dtype).mean(-1)
        if self.world.active:
            self._gather(result)
        loss = (result.losses * w).sum(1).mean().item()
        if math.isfinite(loss):
            fold_meta_batch(self.meta.running, plan.steps, plan.loss_steps, result.stats)
        return result, loss

    def _place(self, batch: TaskBatch, second_order: bool) -> TaskBatch:
        batch = batch.to(self.device, self.dtype)
        support, query = self.paths.layout_for(second_order)
        return batch.channels_last(support) if query else batch

    def _gather(self, result: BatchResult) -> None:
        """Sum meta-gradients over ranks; gather per-task results in global task order."""
        world = self.world
        params = [p for p in self.meta_parameters() if p.grad is not None]
        all_reduce_sum([p.grad for p in params], world)
        counts = [result.losses.shape[0]] * world.size
        result.losses = all_gather_rows(result.losses, counts, world)
        result.accuracy = all_gather_rows(result.accuracy, counts, world)
        shapes = [[(m.shape, v.shape) for m, v in fwd] for fwd in result.stats[0]]
        flat = torch.stack([torch.cat([torch.cat([m, v]) for fwd in task for m, v in fwd])
                            for task in result.stats])
        result.stats = [_unflatten(row, shapes) for row in all_gather_rows(flat, counts, world)]

    def outer_step(self, loss: float, lr: float) -> None:
        """Clamp the network's meta-gradient (grad_clip), refuse non-finite losses, step Adam."""
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"meta-loss is {loss}; no update applied")
        clip = self.config.train.grad_clip
        if clip > 0:
            for v in [*self.meta.adapted.values(), *self.meta.bn.values()]:
                if v.grad is not None:
                    v.grad.clamp_(-clip, clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()

    # ---- evaluation -----------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, batch: TaskBatch, steps: int | None = None, chunk: int = 0,
                 impl: str | None = None) -> EvalResult:
        """Adapt to each task (first order, no graph) and predict its queries; leaves every
        stored tensor, the running BN sets included, unchanged. Tasks are adapted in bulk: on
        CPU `task_threads` of them at once, vmapped `chunk` at a time (0: all) with
        impl = "vmap". `impl` defaults to the training one (on CPU the threaded loop adapts
        tasks faster than vmap: benchmarks/README.md)."""
        impl = impl or self.impl
        steps = steps or self.config.train.eval_inner_steps
        plan = InnerPlan(steps, (steps - 1,), second_order=False, track_stats=False,
                         use_running=self.config.maml_pp.bn_eval_stats == "running",
                         fused=self.paths.fused_kernels, fft_conv=self.paths.fft_conv)
        batch = self._place(batch, second_order=False)
        with self.paths.autocast(self.device):
            result = meta_batch(self.meta, batch, plan, None, impl, chunk,
                                workers=self.paths.task_threads)
        logits = result.logits
        accuracy = (logits.argmax(-1) == batch.y_query).to(self.dtype).mean(-1)
        return EvalResult(logits, accuracy, result.losses[:, -1])

    # ---- checkpoints ----------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor needed to continue training: network, BN, LSLR, running sets and Adam
        moments/step counts, under flat names (safetensors-ready, detached CPU copies)."""
        out = {f"net.{k}": v for k, v in self.meta.adapted.items()}
        out.update({f"bn.{k}": v for k, v in self.meta.bn.items()})
        out.update({f"lslr.{k}": v for k, v in self.meta.lrs.items()})
        out.update({f"stats.{k}": v for k, v in self.meta.running.items()})
        for name, param in self.named_meta_parameters():
            for key, value in self.optimizer.state.get(param, {}).items():
                out[f"adam.{name}.{key}"] = value
        return {k: v.detach().to("cpu").clone().contiguous() for k, v in out.items()}

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        groups = {"net": self.meta.adapted, "bn": self.meta.bn, "lslr": self.meta.lrs,
                  "stats": self.meta.running}
        expected = {f"{g}.{k}" for g, d in groups.items() for k in d}
        missing = expected - tensors.keys()
        if missing:
            raise ValueError(f"checkpoint lacks {sorted(missing)[:3]}")
        for g, d in groups.items():
            for k, v in d.items():
                src = tensors[f"{g}.{k}"]
                if src.shape != v.shape:
                    raise ValueError(f"checkpoint tensor {g}.{k} has shape {tuple(src.shape)}, "
                                     f"expected {tuple(v.shape)}")
                v.copy_(src)
        self.optimizer.state.clear()
        for name, param in self.named_meta_parameters():
            state = {key.rsplit(".", 1)[1]: value for key, value in tensors.items()
                     if key.startswith(f"adam.{name}.") and key.count(".") == name.count(".") + 2}
            if state:
                self.optimizer.state[param] = {
                    k: (v.to(self.device) if k != "step" else v.clone()) for k, v in state.items()
                }
