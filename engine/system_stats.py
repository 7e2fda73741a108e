"""Snapshots of the engine's resource use for `system` events: NVML on CUDA, CPU/RAM always."""

from __future__ import annotations

import os
from typing import Any

import psutil
import torch


class SystemStats:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.process = psutil.Process(os.getpid())
        self.process.cpu_percent(None)  # first call primes the counter
        self.handle = None
        if device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                index = device.index if device.index is not None else torch.cuda.current_device()
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            except Exception:  # no NVML: report CPU figures only
                self.handle = None

    def snapshot(self) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "device": str(self.device),
            "gpu_util": None,
            "gpu_mem_used": None,
            "gpu_mem_total": None,
            "cpu_percent": self.process.cpu_percent(None),
            "rss": self.process.memory_info().rss,
        }
        if self.handle is not None:
            import pynvml

            util = pynvml.nvmlDeviceGetUtilizationRates(self.handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(self.handle)
            stats.update(gpu_util=util.gpu, gpu_mem_used=mem.used, gpu_mem_total=mem.total)
        return stats
