"""`mamlpp data ...`: fetch, import and inspect cached datasets."""

from __future__ import annotations

import typer

data_app = typer.Typer(help="Fetch, import and inspect datasets.", no_args_is_help=True)
