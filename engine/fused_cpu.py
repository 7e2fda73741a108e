"""Batch norm fused with the 2x2 max-pool after it, compiled for the CPU (`fused_bn_pool.c`).

torch runs a training-mode batch norm, the max-pool and the layout copies between them as
separate memory-bound passes, 2.5-6x slower than the bytes they move allow, and no formulation
in torch ops is faster (benchmarks/rest_alternatives.py). One C pass per channel computes the
statistics, normalises, pools and writes only the pooled values and each window's one-byte code;
its backward takes the batch-norm sums over the pooled quarter (the gradient is zero elsewhere)
and writes the input gradient in one pass (benchmarks/fused_kernels.py: 4-7x faster forward,
1.5-2.8x faster backward). The derivative of that backward, which second-order MAML takes,
is engine/batch_norm.py's closed form in two passes (sums, then the input's and pooled
gradient's derivatives; `benchmarks/fused_kernels.py --second`: about 3x faster than the same
formula in torch's ops). Same function as engine/batch_norm.py's `batch_norm_pool` to float32
rounding, the same window chosen (the first maximum in scan order, as torch's kernels), the same
codes; tests/test_fused_cpu.py checks it, to the second derivative, against float64.

A call on a thread with several torch intra-op threads (the engine's single task thread of
mini-ImageNet's second-order steps) splits a large tensor's channels across that many threads,
as torch's own ops would use them; task threads share the cores (one intra-op thread each where
there is a task thread per core) and split only what their own count allows.

The C file has no dependency but libm: it is compiled once (about a second, with the C compiler
`$CC` or `cc`) into the user cache folder, under a name that carries its source's hash, and
loaded with ctypes, which releases the GIL during the call. The compiled file is written under a
temporary name and renamed into place, so processes building at once never see half a library.
`train.fused_kernels = auto` uses it on CPU where it builds and falls back to torch's ops, with a
warning, where the build fails; `on` requires it; `off` never.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import platformdirs
import torch
from torch._C._functorch import is_batchedtensor

from engine.errors import UserError
from engine.max_pool import MAX_CODED_WIDTH
from engine.task_threads import helper_pool, run_split

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("fused_bn_pool.c")
_CFLAGS, _LIBS = ["-O3", "-shared", "-fPIC"], ["-lm"]
# elements of a batch-norm input from which a call splits its channels across intra-op threads
PARALLEL_MIN_ELEMENTS = 2**20
_lock = threading.Lock()
_state: dict = {"lib": None, "error": None}


def _compiler() -> str:
    return os.environ.get("CC", "cc")


@functools.cache
def toolchain() -> str | None:
    """Why the kernels cannot be built here, or None when a C compiler is on PATH."""
    if shutil.which(_compiler()) is None:
        return f"no C compiler ({_compiler()}) on PATH"
    return None


def _library_path() -> Path:
    flags = " ".join(_CFLAGS + _LIBS).encode()
    digest = hashlib.sha256(_SOURCE.read_bytes() + flags).hexdigest()[:16]
    return platformdirs.user_cache_path("mamlpp") / "kernels" / f"fused_bn_pool-{digest}.so"


def load(required: bool = False):
    """The loaded library, compiled on first use; None (with a logged warning) where it cannot
    be built, or a UserError when `required`."""
    with _lock:
        if _state["lib"] is None and _state["error"] is None:
            _state["error"] = toolchain()
            if _state["error"] is None:
                _build()
        if _state["lib"] is None and required:
            raise UserError(f"train.fused_kernels = on, but the fused CPU kernels cannot be "
                            f"built: {_state['error']}; set train.fused_kernels = auto or off.")
        return _state["lib"]


def _build() -> None:
    path = _library_path()
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
            os.close(fd)
            try:
                subprocess.run([_compiler(), *_CFLAGS, str(_SOURCE), "-o", tmp, *_LIBS],
                               check=True, capture_output=True, text=True, timeout=300)
                os.replace(tmp, path)
            finally:
                Path(tmp).unlink(missing_ok=True)
        _state["lib"] = _bind(ctypes.CDLL(str(path)))
    except (OSError, subprocess.SubprocessError) as error:  # torch's ops remain
        detail = getattr(error, "stderr", None) or str(error)
        _state["error"] = f"the build failed ({detail.strip()[-300:]})"
        log.warning("fused CPU kernels unavailable, using torch's ops: %s", _state["error"])


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.bn_pool_forward.argtypes = [p, p, p, i64, i64, i64, i64, ctypes.c_double, p, p, p, p,
                                    i64, i64]
    lib.bn_pool_backward.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, p, p, p, i64, i64]
    lib.bn_pool_backward2.argtypes = [p, p, p, p, p, p, p, p, p, p, p, i64, i64, i64, i64, p, p,
                                      p, i64, i64]
    lib.bn_pool_forward.restype = lib.bn_pool_backward.restype = None
    lib.bn_pool_backward2.restype = None
    return lib


def _over_channels(x: torch.Tensor, call) -> None:
    """Run `call(c0, c1)` over all of x's channels, split across the calling thread's intra-op
    threads where the tensor is large enough to repay the hand-off (task_threads.run_split)."""
    run_split(x.shape[1], call, x.numel() >= PARALLEL_MIN_ELEMENTS, helper_pool)


def applies(x: torch.Tensor) -> bool:
    """Whether the loaded kernels take this batch-norm input: float32 NCHW-contiguous on the
    CPU, plain autograd (not under torch.func), rows narrow enough for one-byte codes."""
    return (_state["lib"] is not None and x.device.type == "cpu"
            and x.dtype == torch.float32 and x.dim() == 4 and x.is_contiguous()
            and 2 <= x.shape[-1] <= MAX_CODED_WIDTH and x.shape[-2] >= 2
            and not is_batchedtensor(x))


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


def forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float):
    """(pooled y, batch mean, batch invstd, codes) of batch norm then the 2x2 max-pool."""
    x, w, b = _f32(x), _f32(w), _f32(b)
    n, c, h, wd = x.shape
    out = x.new_empty((n, c, h // 2, wd // 2))
    codes = torch.empty(out.shape, dtype=torch.uint8)
    mean, invstd = x.new_empty(c), x.new_empty(c)
    _over_channels(x, functools.partial(
        _state["lib"].bn_pool_forward, x.data_ptr(), w.data_ptr(), b.data_ptr(), n, c, h, wd,
        float(eps), out.data_ptr(), codes.data_ptr(), mean.data_ptr(), invstd.data_ptr()))
    return out, mean, invstd, codes


def backward(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mean: torch.Tensor,
             invstd: torch.Tensor, codes: torch.Tensor):
    """(gx, gw, gb) of batch norm given the gradient g of its pooled output."""
    g, x, w, mean, invstd = (_f32(t) for t in (g, x, w, mean, invstd))
    codes = codes.contiguous()
    n, c, h, wd = x.shape
    gx, gw, gb = torch.empty_like(x), x.new_empty(c), x.new_empty(c)
    _over_channels(x, functools.partial(
        _state["lib"].bn_pool_backward, g.data_ptr(), x.data_ptr(), w.data_ptr(),
        mean.data_ptr(), invstd.data_ptr(), codes.data_ptr(), n, c, h, wd, gx.data_ptr(),
        gw.data_ptr(), gb.data_ptr()))
    return gx, gw, gb


def backward2(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mean: torch.Tensor,
              invstd: torch.Tensor, codes: torch.Tensor, gw: torch.Tensor, gb: torch.Tensor,
              ggx: torch.Tensor, ggw: torch.Tensor | None, ggb: torch.Tensor | None):
    """(d_g, d_x, d_w): the derivatives of `backward`'s (gx, gw, gb) along (ggx, ggw, ggb), for
    its inputs g (pooled), x and w; ggw and ggb may be None (zero)."""
    g, x, w, mean, invstd, gw, gb, ggx = (_f32(t) for t in (g, x, w, mean, invstd, gw, gb, ggx))
    ggw, ggb = (None if t is None else _f32(t) for t in (ggw, ggb))
    codes = codes.contiguous()
    n, c, h, wd = x.shape
    d_g, d_x, d_w = torch.empty_like(g), torch.empty_like(x), x.new_empty(c)
    _over_channels(x, functools.partial(
        _state["lib"].bn_pool_backward2, g.data_ptr(), x.data_ptr(), w.data_ptr(),
        mean.data_ptr(), invstd.data_ptr(), codes.data_ptr(), gw.data_ptr(), gb.data_ptr(),
        ggx.data_ptr(), None if ggw is None else ggw.data_ptr(),
        None if ggb is None else ggb.data_ptr(), n, c, h, wd, d_g.data_ptr(), d_x.data_ptr(),
        d_w.data_ptr()))
    return d_g, d_x, d_w
