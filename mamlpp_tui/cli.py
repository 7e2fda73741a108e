"""The `mamlpp` command line. Every user error becomes one sentence and a non-zero exit."""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console
from rich.table import Table

from engine.errors import UserError
from mamlpp_tui.data_cli import data_app

app = typer.Typer(
    help="MAML++ few-shot training: run, resume, watch and evaluate runs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data_app, name="data")
console = Console()


@app.command()
def presets(
    name: str = typer.Argument(None, help="Show this preset's TOML."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List the presets, or show one."""
    from engine.config import from_dict
    from engine.presets import load_preset_raw, preset_names, preset_text

    if name is not None:
        if as_json:
            print(json.dumps(from_dict(load_preset_raw(name)).to_dict(), indent=2))
        else:
            console.print(preset_text(name), markup=False, highlight=False)
        return
    configs = [from_dict(load_preset_raw(n)) for n in preset_names()]
    if as_json:
        print(json.dumps([c.to_dict() for c in configs], indent=2))
        return
    table = Table(title="presets")
    for col in ("name", "dataset", "ways", "shots", "queries", "meta_batch", "epochs"):
        table.add_column(col, no_wrap=True)
    table.add_column("description")
    for c in configs:
        table.add_row(c.name, c.data.dataset, str(c.data.ways), str(c.data.shots),
                      str(c.data.queries), str(c.train.meta_batch), str(c.train.epochs),
                      c.description)
    console.print(table)


def main() -> None:
    """Entry point: run the Typer app, turning user errors into one clear line."""
    try:
        app(standalone_mode=False)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors etc.
        import click

        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        if isinstance(e, click.ClickException):
            print(f"error: {e.format_message()}", file=sys.stderr)
            sys.exit(e.exit_code)
        raise
