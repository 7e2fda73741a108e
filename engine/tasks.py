"""The unit of work the meta-learner consumes: a meta-batch of few-shot tasks as tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TaskBatch:
    """B tasks; images already float and normalised, labels 0..ways-1.

    x_support: [B, ways*shots, C, H, W]   y_support: [B, ways*shots] (int64)
    x_query:   [B, ways*queries, C, H, W] y_query:   [B, ways*queries] (int64)
    """

    x_support: torch.Tensor
    y_support: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor

    @property
    def size(self) -> int:
        return self.x_support.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TaskBatch:
        def move(x: torch.Tensor) -> torch.Tensor:
            return x.to(device=device, dtype=dtype, non_blocking=True)

        return TaskBatch(move(self.x_support), self.y_support.to(device, non_blocking=True),
                         move(self.x_query), self.y_query.to(device, non_blocking=True))

    def slice(self, start: int, stop: int) -> TaskBatch:
        return TaskBatch(self.x_support[start:stop], self.y_support[start:stop],
                         self.x_query[start:stop], self.y_query[start:stop])
