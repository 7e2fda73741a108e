"""Batch norm fused with the 2x2 max-pool after it, compiled for the CPU (`fused_bn_pool.cpp`).

torch runs a training-mode batch norm, the max-pool and the layout copies between them as
separate memory-bound passes, 2.5-6x slower than the bytes they move allow, and no formulation
in torch ops is faster (benchmarks/rest_alternatives.py). One C++ pass per channel computes the
statistics, normalises, pools and writes only the pooled values and each window's one-byte code;
its backward takes the batch-norm sums over the pooled quarter (the gradient is zero elsewhere)
and writes the input gradient in one pass (benchmarks/fused_kernels.py: 4-7x faster forward,
1.5-2.8x faster backward). Same function as engine/batch_norm.py's `batch_norm_pool` to float32
rounding, the same window chosen (the first maximum in scan order, as torch's kernels), the same
codes; tests/test_fused_cpu.py checks it against float64.

The kernels are built once per torch version with torch.utils.cpp_extension (a C++ compiler and
ninja on PATH; about a minute on two cores) into torch's extension cache, and loaded from there
afterwards. `train.fused_kernels = auto` uses them on CPU where that toolchain exists and falls
back to torch's ops, with a warning, where the build fails; `on` requires them; `off` never.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path

import torch
from torch._C._functorch import is_batchedtensor

from engine.errors import UserError

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("fused_bn_pool.cpp")
_MAX_WIDTH = 254  # codes up to W + 1 fit a byte (engine/max_pool.py)
STALE_LOCK_S = 600
_lock = threading.Lock()
_state: dict = {"ext": None, "error": None}


@functools.cache
def toolchain() -> str | None:
    """Why the kernels cannot be built here, or None when a compiler and ninja are on PATH."""
    from torch.utils.cpp_extension import is_ninja_available

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on PATH"
    if not is_ninja_available():
        return "ninja is not on PATH"
    return None


def _name() -> str:
    # one build per torch version: an extension compiled against another torch's headers
    # must never be loaded
    return "mamlpp_fused_bn_pool_" + re.sub(r"\W", "_", torch.__version__)


def load(required: bool = False):
    """The compiled module, built on first use; None (with a logged warning) where it cannot
    be built, or a UserError when `required`."""
    with _lock:
        if _state["ext"] is None and _state["error"] is None:
            _state["error"] = toolchain()
            if _state["error"] is None:
                _build()
        if _state["ext"] is None and required:
            raise UserError(f"train.fused_kernels = on, but the fused CPU kernels cannot be "
                            f"built: {_state['error']}; set train.fused_kernels = auto or off.")
        return _state["ext"]


def _build() -> None:
    from torch.utils.cpp_extension import _get_build_directory, load_inline

    try:
        folder = Path(_get_build_directory(_name(), verbose=False))
        built = any(folder.glob("*.so"))
        _clear_stale_lock(folder / "lock")
    except Exception:  # a private helper of torch's: only the message depends on it
        built = False
    if not built:
        log.warning("building mamlpp's fused CPU kernels once for torch %s (about a minute)",
                    torch.__version__)
    try:
        _state["ext"] = load_inline(
            _name(), cpp_sources=_SOURCE.read_text(),
            functions=["bn_pool_forward", "bn_pool_backward"], extra_cflags=["-O3"])
    except Exception as error:  # a compiler error must not end the run: torch's ops remain
        _state["error"] = f"the build failed ({type(error).__name__}: {str(error)[-300:]})"
        log.warning("fused CPU kernels unavailable, using torch's ops: %s", _state["error"])


def _clear_stale_lock(lock: Path) -> None:
    """torch waits, without end, for the lock file of a build in progress; a build that was
    killed leaves it behind. A build takes about a minute: a lock older than STALE_LOCK_S is
    such a leftover."""
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
            log.warning("removed %s, left by an interrupted build of the fused CPU kernels", lock)
    except FileNotFoundError:
        pass


def applies(x: torch.Tensor) -> bool:
    """Whether the loaded kernels take this batch-norm input: float32 NCHW-contiguous on the
    CPU, plain autograd (not under torch.func), rows narrow enough for one-byte codes."""
    return (_state["ext"] is not None and x.device.type == "cpu"
            and x.dtype == torch.float32 and x.dim() == 4 and x.is_contiguous()
            and 2 <= x.shape[-1] <= _MAX_WIDTH and x.shape[-2] >= 2
            and not is_batchedtensor(x))


def forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float):
    """(pooled y, batch mean, batch invstd, codes) of batch norm then the 2x2 max-pool."""
    return tuple(_state["ext"].bn_pool_forward(x, w, b, eps))


def backward(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mean: torch.Tensor,
             invstd: torch.Tensor, codes: torch.Tensor):
    """(gx, gw, gb) of batch norm given the gradient g of its pooled output."""
    return tuple(_state["ext"].bn_pool_backward(g, x, w, mean, invstd, codes))
