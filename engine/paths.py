"""Where mamlpp keeps its state: `MAMLPP_HOME` if set, else the platform's user folders."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def _home() -> Path | None:
    value = os.environ.get("MAMLPP_HOME")
    return Path(value).expanduser() if value else None


def runs_root() -> Path:
    home = _home()
    return home / "runs" if home else platformdirs.user_data_path("mamlpp") / "runs"


def data_root() -> Path:
    home = _home()
    return home / "data" if home else platformdirs.user_cache_path("mamlpp") / "data"
