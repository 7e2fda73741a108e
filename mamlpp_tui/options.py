"""Options several commands share, declared once (Typer `Annotated` parameters)."""

from __future__ import annotations

import re
from typing import Annotated

import typer

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _check_device(value: str) -> str:
    """Refuse a device name torch would not parse before any work starts (the parser's usage
    error: one line, exit 2)."""
    if not _DEVICE_RE.match(value):
        raise typer.BadParameter(f"{value!r} is not a device; use auto, cpu, cuda or cuda:N")
    return value


Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.",
                                     callback=_check_device)]
AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
RunRef = Annotated[str, typer.Argument(metavar="RUN", help="Run id or unique prefix.")]
