"""The `mamlpp` command line. Every user error becomes one sentence and a non-zero exit."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer
from rich.console import Console

from engine.errors import UserError
from mamlpp_tui.data_cli import data_app
from mamlpp_tui.options import Device
from mamlpp_tui.terminal import console

app = typer.Typer(
    help="MAML++ few-shot training: run, resume, watch and evaluate runs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data_app, name="data")


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
    from mamlpp_tui.tables import presets_table

    console.print(presets_table(configs, console.width))


# ---- runs ----------------------------------------------------------------------------------


def _open_run(ref: str):
    from engine.run_store import find_run

    return find_run(ref)


def _start(run, device: str, detach: bool, no_tui: bool, world=None) -> None:
    """Foreground with progress (--no-tui, no terminal or torchrun), detached, or background +
    dashboard."""
    if world is not None and world.active:
        _foreground(run, device, world)
        return
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if no_tui or (not interactive and not detach):
        _foreground(run, device)
        return
    from mamlpp_tui.launch import start_engine

    pid = start_engine(run, device)
    if detach:
        print(run.run_id)
        return
    from mamlpp_tui.dashboard import run_dashboard

    run_dashboard(run.path)
    console.print(f"dashboard closed; run {run.run_id} goes on (engine pid {pid}). "
                  f"Reopen with `mamlpp watch {run.run_id}`.")


def _foreground(run, device: str, world=None) -> None:
    from engine.distributed import SINGLE
    from engine.trainer import Trainer, run_config
    from mamlpp_tui.progress import ProgressDisplay

    world = world or SINGLE
    if not world.is_main:  # other ranks compute; rank 0 reports
        state = Trainer(run, device, world=world).train()
        sys.exit(0 if state in ("finished", "stopped") else 1)
    config = run_config(run)
    where = f" on {world.size} processes" if world.active else ""
    console.print(f"run [bold]{run.run_id}[/] ({config.name}) in {run.path}{where}")
    display = ProgressDisplay(config.train.epochs * config.train.iters_per_epoch, Console())
    try:
        state = Trainer(run, device, on_progress=display, world=world).train()
    finally:
        display.close()
    status = run.read_status()
    if state == "finished":
        from mamlpp_tui.tables import ensemble_table

        ensemble = run.read_ensemble()
        if ensemble:
            console.print(ensemble_table(ensemble, console.width))
        console.print(f"run {run.run_id} finished")
    elif state == "stopped":
        console.print(f"run {run.run_id} stopped; continue it with `mamlpp resume {run.run_id}`")
        sys.exit(130 if status.get("error") is None else 1)
    else:
        print(f"error: run {run.run_id} failed: {status.get('error')} "
              f"(see {run.log_path})", file=sys.stderr)
        sys.exit(1)


@app.command()
def run(
    preset: str = typer.Option(None, "--preset", "-p", help="Preset name (default quickstart)."),
    config: Path = typer.Option(None, "--config", "-c", help="A config TOML file."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override: section.key=value."),
    name: str = typer.Option(None, "--name", help="Run name (the run id starts with it)."),
    device: Device = "auto",
    detach: bool = typer.Option(False, "--detach", help="Print the run id and return."),
    no_tui: bool = typer.Option(False, "--no-tui", help="Train in the foreground."),
    study: str = typer.Option(None, "--study", help="Tag the run as a member of this study, "
                              "with --variant (as `mamlpp sweep/ablate --dry-run` prints)."),
    variant: str = typer.Option(None, "--variant", help="The study variant this run is."),
) -> None:
    """Start a new training run."""
    from engine.config import resolve
    from engine.data import require_dataset
    from engine.distributed import broadcast_object, check_divisible, init_world
    from engine.run_store import RunDir
    from engine.trainer import pick_device

    cfg = resolve(preset, config, set_)
    world = init_world(device)
    check_divisible(cfg.train.meta_batch, world)
    pick_device(device, world)
    from engine.data.folder import run_data_notes  # imported datasets: shape, small classes

    for note in run_data_notes(cfg) if world.is_main else []:
        print(f"warning: {note}.", file=sys.stderr)
    if world.is_main:  # an Omniglot cache with mamlpp's previous class split is rebuilt here
        from mamlpp_tui.data_cli import _reporter

        require_dataset(cfg.data.dataset, reporter=_reporter())
    else:
        require_dataset(cfg.data.dataset, refresh=False)
    from mamlpp_tui.study_cli import new_run

    path = str(new_run(cfg, name, study, variant).path) if world.is_main else None
    _start(RunDir(Path(broadcast_object(path, world))), device, detach, no_tui, world)


@app.command()
def resume(
    run_ref: str = typer.Argument(..., metavar="RUN", help="Run id or unique prefix."),
    device: Device = "auto",
    detach: bool = typer.Option(False, "--detach", help="Print the run id and return."),
    no_tui: bool = typer.Option(False, "--no-tui", help="Train in the foreground."),
) -> None:
    """Continue a stopped, killed or crashed run from its newest valid checkpoint."""
    from engine.distributed import broadcast_object, init_world
    from engine.run_store import RunDir
    from engine.trainer import pick_device

    world = init_world(device)
    if not world.is_main:
        path = broadcast_object(None, world)
        _start(RunDir(Path(path)), device, detach, no_tui, world)
        return
    run_dir = _open_run(run_ref)
    status = run_dir.reconcile_status()
    if run_dir.is_locked():
        raise UserError(f"Run {run_dir.run_id} is already running (pid "
                        f"{run_dir.lock_holder_pid()}); watch it with `mamlpp watch "
                        f"{run_dir.run_id}`.")
    if status.get("state") == "finished":
        raise UserError(f"Run {run_dir.run_id} already finished; evaluate it with "
                        f"`mamlpp ensemble {run_dir.run_id}`.")
    from engine.data.splits import check_run_data
    from mamlpp_tui.data_cli import _reporter

    check_run_data(run_dir, _reporter())  # its class split, before the engine starts
    pick_device(device, world)
    broadcast_object(str(run_dir.path), world)
    _start(run_dir, device, detach, no_tui, world)


@app.command("ensemble")
def ensemble_cmd(
    run_ref: str = typer.Argument(..., metavar="RUN", help="Run id or unique prefix."),
    top_k: int = typer.Option(None, "--top-k", min=1, help="Members (default: the config's)."),
    tasks: int = typer.Option(None, "--tasks", min=1, help="Test tasks (default eval.test_tasks)."),
    device: Device = "auto",
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    plain: bool = typer.Option(False, "--plain", help="Plain sentences, one per member and "
                               "one for the ensemble (for logs), instead of a table."),
) -> None:
    """Evaluate the top-k validation epochs on fixed test tasks and average their logits."""
    from engine.trainer import pick_device, run_config, run_ensemble
    from mamlpp_tui.tables import ensemble_table

    run_dir = _open_run(run_ref)
    result = run_ensemble(run_dir, run_config(run_dir), pick_device(device), top_k, tasks)
    if as_json:
        print(json.dumps(result, indent=2))
    elif plain:
        from engine.evaluation import ensemble_sentences

        for line in ensemble_sentences(result):
            print(line)
    else:
        console.print(ensemble_table(result, console.width))


def _control(run_ref: str, command: str, wait_for: str | None, timeout: float) -> None:
    from engine.control import send

    run_dir = _open_run(run_ref)
    status = run_dir.read_status()
    if not run_dir.is_locked():
        raise UserError(f"Run {run_dir.run_id} is not running (state {status.get('state')}); "
                        f"continue it with `mamlpp resume {run_dir.run_id}`.")
    send(run_dir, command)
    deadline = time.monotonic() + timeout
    while wait_for and time.monotonic() < deadline:
        state = run_dir.read_status().get("state")
        if state == wait_for or not run_dir.is_locked():
            console.print(f"run {run_dir.run_id} is {state}")
            return
        time.sleep(0.1)
    console.print(f"{command} sent to run {run_dir.run_id}; it acts between iterations")


@app.command()
def pause(run_ref: str = typer.Argument(..., metavar="RUN")) -> None:
    """Pause a running run after its current iteration."""
    _control(run_ref, "pause", "paused", 30)


@app.command()
def unpause(run_ref: str = typer.Argument(..., metavar="RUN")) -> None:
    """Let a paused run go on."""
    _control(run_ref, "unpause", "running", 10)


@app.command()
def stop(run_ref: str = typer.Argument(..., metavar="RUN")) -> None:
    """Checkpoint and stop a run (continue it later with `mamlpp resume`)."""
    _control(run_ref, "stop", "stopped", 120)


@app.command()
def runs(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List runs and their state."""
    from engine.run_store import list_runs
    from mamlpp_tui.tables import run_summary, runs_table

    summaries = [run_summary(r) for r in list_runs()]
    if as_json:
        print(json.dumps(summaries, indent=2))
    elif not summaries:
        console.print("no runs yet; start one with `mamlpp run`")
    else:
        console.print(runs_table(summaries, console.width))


@app.command()
def show(
    run_ref: str = typer.Argument(..., metavar="RUN"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """One run in detail: status, validation history, ensemble."""
    from mamlpp_tui.tables import run_summary, show_tables

    summary = run_summary(_open_run(run_ref))
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    for table in show_tables(summary, console.width):
        console.print(table)


@app.command()
def watch(run_ref: str = typer.Argument(..., metavar="RUN|STUDY")) -> None:
    """Open the live dashboard on a run (running, paused, finished or crashed), or the study
    view on a study (Enter opens a member's dashboard, Escape comes back)."""
    from mamlpp_tui.study_cli import watch as watch_any

    watch_any(run_ref)


# `sweep`, `ablate`, `study show|resume|collect` and `studies` live in mamlpp_tui/study_cli.py.
__import__("mamlpp_tui.study_cli", fromlist=["register"]).register(app)


# `mamlpp predict` and `mamlpp export` live in their own modules (they import torch when run).
app.command("predict")(__import__("mamlpp_tui.predict_cli", fromlist=["predict"]).predict)
app.command("export")(__import__("mamlpp_tui.export_cli", fromlist=["export"]).export)
# `mamlpp bench` lives in its own module, registered here (bench_cli imports torch only when run).
app.command("bench")(__import__("mamlpp_tui.bench_cli", fromlist=["bench"]).bench)
# `mamlpp report` and `mamlpp compare` (report_cli imports matplotlib only when drawing).
app.command("report")(__import__("mamlpp_tui.report_cli", fromlist=["report"]).report)
app.command("compare")(__import__("mamlpp_tui.report_cli", fromlist=["compare"]).compare)


def _click_error(e: BaseException) -> tuple[str, int] | None:
    """(one-line message, exit code) for the command-line parser's own errors, else None.

    Typer raised click's exceptions up to 0.28 and raises its vendored copy of them from 0.29
    (which no longer installs click), so they are recognised by their shape rather than their
    class: a usage error has `format_message()` and `exit_code`, Abort is Ctrl-C at a prompt."""
    names = {c.__name__ for c in type(e).__mro__}
    if "Abort" in names:
        return "aborted", 1
    if "NoArgsIsHelpError" in names:  # a bare group: its help is the answer, already printed
        return "", 0
    if "ClickException" not in names or not hasattr(e, "format_message"):
        return None
    message = " ".join(str(e.format_message()).split())
    ctx = getattr(e, "ctx", None)
    if "UsageError" in names:
        where = getattr(ctx, "command_path", None) or "mamlpp"
        return f"{message.rstrip('.')}; see `{where} --help`.", 2
    return message, int(getattr(e, "exit_code", 1) or 1)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the Typer app; user errors and usage errors become one line on stderr
    and exit code 2, never a traceback."""
    try:
        code = typer.main.get_command(app).main(args=argv, prog_name="mamlpp",
                                                  standalone_mode=False)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:
        found = _click_error(e)
        if found is None:
            raise
        message, code = found
        if message:
            print(f"error: {message}", file=sys.stderr)
        sys.exit(code)
    sys.exit(code if isinstance(code, int) else 0)
