"""`mamlpp export RUN`: one command, one mode per destination option.

`--to DIR` writes a self-contained model folder (engine/model_export.py); `--tensorboard DIR`
and `--csv DIR` write the run's events as TensorBoard scalars or tidy CSV files
(mamlpp_tui/report/tensorboard.py, tidy_csv.py). Exactly one mode
option is given per call; a new mode is one more entry in the mode table, one more option in
`export`'s signature and one handler.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from engine.errors import UserError
from mamlpp_tui.options import RunRef
from mamlpp_tui.predict_cli import Members, MembersOption


def _model_folder(run_ref: str, to: Path, options: dict[str, Any]) -> None:
    from engine.adapt import resolve_source
    from engine.model_export import export_model

    members = options.get("--members")
    source = resolve_source(run_ref, members.value if members else None)
    if source.kind != "run":
        raise UserError(f"{run_ref} is already an export; `mamlpp export` takes a run.")
    manifest = export_model(source, to)
    for note in source.notes:
        print(f"note: {note}.")
    epochs = ", ".join(str(m["epoch"]) for m in manifest["members"])
    size = sum(f["bytes"] for f in manifest["files"].values())
    what = (f"an ensemble of {len(manifest['members'])} (epochs {epochs})"
            if len(manifest["members"]) > 1 else f"one network (epoch {epochs})")
    print(f"exported run {source.label}, {what}, to {Path(to).expanduser()} "
          f"({size / 1e6:.1f} MB; model card in README.md)")
    print(f"use it with `mamlpp predict {to} --support SUPPORT_DIR --query QUERY...`")


def _tensorboard(run_ref: str, out: Path, options: dict[str, Any]) -> None:
    from engine.run_store import find_run
    from mamlpp_tui.report.rundata import load_run
    from mamlpp_tui.report.tensorboard import export_tensorboard

    target = export_tensorboard(load_run(find_run(run_ref)), Path(out).expanduser())
    print(f"wrote TensorBoard scalars to {target}; view with `tensorboard --logdir {out}`")


def _csv(run_ref: str, out: Path, options: dict[str, Any]) -> None:
    from engine.run_store import find_run
    from mamlpp_tui.report.rundata import load_run
    from mamlpp_tui.report.tidy_csv import export_csv

    target = export_csv(load_run(find_run(run_ref)), Path(out).expanduser())
    print(f"wrote {target / 'scalars.csv'} (one row per event and metric) and "
          f"{target / 'config.csv'}")


# option -> (what it writes, handler(run_ref, value, all options)); one option per call
MODES: dict[str, tuple[str, Callable[[str, Any, dict[str, Any]], None]]] = {
    "--to": ("a self-contained model folder for predict and mamlpp.load", _model_folder),
    "--tensorboard": ("the run's events as TensorBoard scalars", _tensorboard),
    "--csv": ("the run's events as tidy CSV files", _csv),
}
# options that only one mode takes
MODE_OPTIONS = {"--members": "--to"}


def dispatch(run_ref: str, values: dict[str, Any]) -> None:
    """Run the one mode whose option is set in `values` (option -> value or None)."""
    given = [o for o in MODES if values.get(o) is not None]
    if len(given) != 1:
        listing = ", ".join(f"{o} ({MODES[o][0]})" for o in MODES)
        what = "none" if not given else " and ".join(given)
        raise UserError(f"Give exactly one of {listing}; got {what}.")
    mode = given[0]
    for option, owner in MODE_OPTIONS.items():
        if values.get(option) is not None and owner != mode:
            raise UserError(f"{option} goes with {owner}, not {mode}.")
    MODES[mode][1](run_ref, values[mode], values)


def export(
    run_ref: RunRef,
    to: Path = typer.Option(None, "--to", metavar="DIR",  # noqa: B008
                            help="Write a self-contained model folder (weights, learned rates, "
                                 "batch-norm sets, preprocessing, config, figures, model card) "
                                 "that `mamlpp predict` and `mamlpp.load` take."),
    members: Members = MembersOption,
    tensorboard: Path = typer.Option(None, "--tensorboard", metavar="DIR",  # noqa: B008
                                     help="Write the run's events as TensorBoard scalars and "
                                          "its config as text into DIR/<run id> (needs "
                                          "`pip install 'mamlpp\\[tensorboard]'`)."),
    csv: Path = typer.Option(None, "--csv", metavar="DIR",  # noqa: B008
                             help="Write DIR/<run id>/scalars.csv (one row per event and "
                                  "metric) and config.csv."),
) -> None:
    """Export a run: a model folder (--to), TensorBoard scalars (--tensorboard) or CSV (--csv)."""
    dispatch(run_ref, {"--to": to, "--members": members, "--tensorboard": tensorboard,
                       "--csv": csv})
