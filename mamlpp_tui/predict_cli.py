"""`mamlpp predict`: adapt a trained run (or an export) on your support images, predict queries."""

from __future__ import annotations

import csv
import json
import sys
from enum import StrEnum
from pathlib import Path

import typer
from rich.console import Console

from mamlpp_tui.options import Device


class Members(StrEnum):
    ensemble = "ensemble"
    best = "best"


MembersOption = typer.Option(
    None, "--members", help="ensemble: the top-k validation epochs, logits averaged (the default "
    "when the run has more than one); best: the best validation epoch.")


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def predict(
    model: str = typer.Argument(..., metavar="RUN_OR_EXPORT",
                                help="Run id, unique prefix, run folder, or a `mamlpp export` "
                                     "folder."),
    more: list[Path] = typer.Argument(  # noqa: B008
        None, metavar="[QUERY]...", show_default=False,
        help="More query paths, e.g. what a shell glob after --query expands to."),
    support: Path = typer.Option(  # noqa: B008
        ..., "--support", help="Folder with one sub-folder of images per class (k >= 1 each); "
        "the sub-folder names are the class names."),
    query: list[Path] = typer.Option(  # noqa: B008
        ..., "--query", help="Query image files or folders (repeatable). Images in folders "
        "named after a support class count as that class: accuracy is reported."),
    steps: int = typer.Option(None, "--steps", min=1,
                              help="Adaptation steps (default: the run's eval_inner_steps)."),
    members: Members = MembersOption,
    device: Device = "auto",
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    as_csv: bool = typer.Option(False, "--csv", help="One CSV row per query: path, predicted, "
                                "true class, then each class's probability."),
) -> None:
    """Adapt a trained model on a support folder and classify query images."""
    from engine.adapt import load, predict_folders
    from engine.errors import UserError

    if as_json and as_csv:
        raise UserError("Give --json or --csv, not both.")
    model_obj = load(model, members.value if members else None, device)
    result = predict_folders(model_obj, support, [*query, *(more or [])], steps)
    for note in result.notes:
        print(f"note: {note}.", file=sys.stderr)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    if as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["path", "predicted", "label", *result.classes])
        for i, path in enumerate(result.paths):
            writer.writerow([path, result.predicted[i], result.labels[i] or "",
                             *(f"{p:.6f}" for p in result.probabilities[i].tolist())])
        return
    _print_table(result)


def _print_table(result) -> None:  # noqa: ANN001 - engine.adapt.Prediction
    from mamlpp_tui.tables import Column, fitted_table

    console = Console()
    labelled = result.labelled > 0
    columns = [Column("query", identifying=True), Column("predicted", identifying=True),
               Column("probability", priority=4, justify="right")]
    if labelled:
        columns.append(Column("true class", priority=3))
    columns += [Column(f"p({c})", priority=1, justify="right") for c in result.classes]
    rows = []
    for i, path in enumerate(result.paths):
        probs = result.probabilities[i].tolist()
        pred = result.predicted[i]
        row = [path, pred, _pct(max(probs))]
        if labelled:
            label = result.labels[i]
            row.append("-" if label is None else
                       (f"[green]{label}[/]" if label == pred else f"[red]{label}[/]"))
        row += [f"{p:.3f}" for p in probs]
        rows.append(row)
    console.print(fitted_table(columns, rows, console.width,
                               title=f"{len(result.paths)} queries, classes "
                                     f"{', '.join(result.classes)}"))
    if labelled:
        correct = sum(p == y for p, y in zip(result.predicted, result.labels) if y is not None)
        console.print(f"accuracy {_pct(result.accuracy)} ({correct} of {result.labelled} "
                      f"labelled queries)", highlight=False)
    members = result.members
    if len(members) > 1:
        who = (f"ensemble of {len(members)} members (epochs "
               f"{', '.join(str(m.epoch) for m in members)}), logits averaged")
    else:
        m = members[0]
        who = f"one member (epoch {m.epoch})" if m.epoch is not None else f"one member ({m.name})"
    s = result.seconds
    console.print(f"{who}; {result.steps} adaptation steps; {len(result.paths)} queries "
                  f"predicted in {s['predict']:.2f} s (images read in {s['read']:.2f} s)",
                  highlight=False)
