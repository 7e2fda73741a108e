"""Per-epoch schedules in closed form, so a resumed run needs no scheduler state."""

from __future__ import annotations

import math

from engine.config import Config


def meta_lr(epoch: int, cfg: Config) -> float:
    """Cosine annealing of the meta learning rate (SPEC 2.6); constant with `cosine = false`."""
    t = cfg.train
    if not cfg.maml_pp.cosine:
        return t.meta_lr
    cosine = (1 + math.cos(math.pi * epoch / t.epochs)) / 2
    return t.min_meta_lr + (t.meta_lr - t.min_meta_lr) * cosine


def second_order_at(epoch: int, cfg: Config) -> bool:
    """Derivative-order annealing (SPEC 2.2): first order before `first_order_epochs`."""
    p = cfg.maml_pp
    return p.second_order and epoch >= p.first_order_epochs
