"""The unit of work the meta-learner consumes: a meta-batch of few-shot tasks as tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def has_nhwc_strides(x: torch.Tensor) -> bool:
    """Whether a [n, C, H, W] tensor is laid out channels-last (TaskBatch.channels_last gives
    images that layout even with one channel, where NCHW and NHWC are otherwise the same)."""
    return x.dim() == 4 and x.stride(1) == 1 and x.shape[2] * x.shape[3] > 1


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

    def channels_last(self, support: bool = True) -> TaskBatch:
        """The same images (only the query's with support=False) laid out channels-last: each
        image's [C, H, W] as [H, W, C] in memory, so a task's [n, C, H, W] view has
        channels-last strides even when C = 1, and convs, batch norm and max-pool run in that
        layout (much faster on CPU for passes differentiated once)."""
        def nhwc(x: torch.Tensor) -> torch.Tensor:
            b, n, c, h, w = x.shape
            strides = (n * h * w * c, h * w * c, 1, w * c, c)
            return torch.empty_strided(x.shape, strides, dtype=x.dtype, device=x.device).copy_(x)

        return TaskBatch(nhwc(self.x_support) if support else self.x_support, self.y_support,
                         nhwc(self.x_query), self.y_query)
