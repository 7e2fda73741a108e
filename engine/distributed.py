"""Data-parallel meta-batches over torch.distributed (launched by `torchrun`).

Tasks are split across ranks by global task index, each rank backpropagates its own tasks'
share of the meta-loss, and the meta-gradients are summed with one all-reduce, so every rank
takes the same Adam step. Only rank 0 touches the run directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where collectives run: cpu for gloo, cuda:<local_rank> for NCCL

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def share(self, start: int, count: int) -> tuple[int, int]:
        """This rank's contiguous part (start, count) of tasks start..start+count-1."""
        per = count // self.size
        extra = count % self.size
        first = start + self.rank * per + min(self.rank, extra)
        return first, per + (1 if self.rank < extra else 0)


SINGLE = World()


def launched() -> bool:
    """Whether this process was started by torchrun (or another env:// launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_world(device: str) -> World:
    """Join the process group torchrun set up: NCCL on GPU, gloo on CPU."""
    if not launched():
        return SINGLE
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), local_rank,
                 f"cuda:{local_rank}" if use_cuda else "cpu")


def check_divisible(meta_batch: int, world: World) -> None:
    if meta_batch % world.size:
        fits = ", ".join(str(world.size * k) for k in range(1, 5))
        raise UserError(f"train.meta_batch={meta_batch} does not split evenly over {world.size} "
                        f"processes; use --set train.meta_batch= one of {fits}.")


def all_reduce_sum(tensors: list[torch.Tensor], world: World) -> None:
    """Sum tensors across ranks in place, flattened into one buffer (one collective)."""
    if not world.active or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def all_gather_rows(x: torch.Tensor, counts: list[int], world: World) -> torch.Tensor:
    """Concatenate each rank's rows (rank order); ranks may hold different row counts."""
    if not world.active:
        return x
    most = max(counts)
    padded = torch.zeros((most, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def broadcast_object(obj, world: World):
    if not world.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_tensors(tensors: dict[str, torch.Tensor], world: World) -> dict[str, torch.Tensor]:
    """Rank 0's tensors on every rank (names, shapes and dtypes travel first)."""
    if not world.active:
        return tensors
    spec = broadcast_object({k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
                            if world.is_main else None, world)
    out = {}
    for k, (shape, dtype) in spec.items():
        t = (tensors[k].contiguous().to(world.device) if world.is_main
             else torch.empty(shape, dtype=dtype, device=world.device))
        dist.broadcast(t, src=0)
        out[k] = t.cpu()
    return out


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()
