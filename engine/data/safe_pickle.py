"""A restricted unpickler for data files: numpy arrays, dicts, lists, str and numbers only.

Pickle can call any importable function while loading; this unpickler resolves only the handful
of numpy reconstruction helpers that a pickled ndarray needs (and latin-1 decoding for Python 2
pickles). Anything else, such as `os.system` or `builtins.open`, is refused before it is looked
up, so a malicious file runs nothing and raises `UnsafePickleError`.
"""

from __future__ import annotations

import codecs
import io
import pickle
from collections import OrderedDict
from typing import Any, BinaryIO

import numpy as np

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle refers to something other than plain data."""


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    if codecs.lookup(encoding).name not in ("iso8859-1", "latin-1"):
        raise UnsafePickleError(f"refused _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin-1", errors)


_ALLOWED: dict[tuple[str, str], Any] = {}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_module, "_reconstruct")] = _multiarray._reconstruct
    _ALLOWED[(_module, "scalar")] = _multiarray.scalar
for _module in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED[(_module, "_frombuffer")] = _numeric._frombuffer
_ALLOWED[("numpy", "ndarray")] = np.ndarray
_ALLOWED[("numpy", "dtype")] = np.dtype
_ALLOWED[("_codecs", "encode")] = _latin1_encode
_ALLOWED[("collections", "OrderedDict")] = OrderedDict


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("persistent id")


def safe_load(f: BinaryIO) -> Any:
    """Unpickle plain data from an open binary file (latin-1 for Python 2 byte strings)."""
    return RestrictedUnpickler(f, encoding="latin1").load()


def safe_loads(data: bytes) -> Any:
    return safe_load(io.BytesIO(data))
