"""`mamlpp sweep`, `mamlpp ablate`, `mamlpp study show|resume|collect`, `mamlpp studies`, and the
study half of `mamlpp watch`. The work is in engine/studies.py, engine/study_runner.py and
engine/study_results.py; this module parses, prints and exits."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from engine.errors import UserError
from mamlpp_tui.options import AsJson, Device
from mamlpp_tui.terminal import console

study_app = typer.Typer(help="Show, resume and collect studies (sweeps and ablations).",
                        no_args_is_help=True)

JOBS_HELP = ("Members run at once (default 1, one after another). On CUDA each job gets its own "
             "GPU through CUDA_VISIBLE_DEVICES (round robin if there are more jobs than GPUs). "
             "On a CPU one run already keeps every core busy (tasks on threads), so N jobs on a "
             "few cores split the same cores N ways and rarely finish sooner; each job gets "
             "cores/N threads.")

Preset = Annotated[str | None, typer.Argument(
    metavar="PRESET", help="Preset name (default quickstart); or give --config.",
    show_default=False)]
Seeds = Annotated[str | None, typer.Option(
    "--seeds", help="Seeds (train.seed) as 0,1,2; default: the config's seed.")]
Sets = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override: section.key=value.")]
ConfigFile = Annotated[Path | None, typer.Option("--config", "-c", help="A config TOML file.")]
Name = Annotated[str | None, typer.Option(
    "--name", help="Study id; the same command with an existing study's --name continues it.")]
Jobs = Annotated[int, typer.Option("--jobs", "-j", min=1, help=JOBS_HELP)]
DryRun = Annotated[bool, typer.Option(
    "--dry-run", help="Write the study and print each member's `mamlpp run` command, one a line "
    "(for Slurm, a queue or torchrun); start nothing. `mamlpp study collect` picks up the runs.")]
Detach = Annotated[bool, typer.Option("--detach", help="Run in the background; print the id.")]
StudyRef = Annotated[str, typer.Argument(metavar="STUDY", help="Study id or unique prefix.")]
RerunDeleted = Annotated[bool, typer.Option(
    "--rerun-deleted", help="Start afresh the members whose run was deleted.")]


def register(app: typer.Typer) -> None:
    """Add the study commands to the main CLI."""
    app.command("sweep")(sweep)
    app.command("ablate")(ablate)
    app.add_typer(study_app, name="study")
    app.command("studies")(studies)


# ---------------------------------------------------------------- starting studies


def sweep(
    preset: Preset = None,
    seeds: Seeds = None,
    grid: Annotated[list[str] | None, typer.Option(
        "--grid", help="A key and its values, as train.inner_steps=1,3,5 (repeat for more "
        "keys: their cartesian product, times the seeds).")] = None,
    set_: Sets = None,
    config: ConfigFile = None,
    name: Name = None,
    jobs: Jobs = 1,
    device: Device = "auto",
    dry_run: DryRun = False,
    detach: Detach = False,
) -> None:
    """Train one configuration over seeds, or over a grid of values times seeds."""
    from engine.studies import parse_grid, parse_seeds, plan_sweep

    plan = plan_sweep(preset, config, set_ or [], parse_seeds(seeds), parse_grid(grid or []))
    _launch(plan, name, jobs, device, dry_run, detach)


def ablate(
    preset: Preset = None,
    seeds: Seeds = None,
    set_: Sets = None,
    config: ConfigFile = None,
    name: Name = None,
    variants: Annotated[str | None, typer.Option(
        "--variants", help="Only these variants, as maml,+msl (default: every row).")] = None,
    leave_one_out: Annotated[bool, typer.Option(
        "--leave-one-out", help="Full MAML++ and MAML++ without each technique, one row each, "
        "instead of the cumulative ladder.")] = False,
    list_: Annotated[bool, typer.Option(
        "--list", help="Print the variants and their overrides; run nothing.")] = False,
    jobs: Jobs = 1,
    device: Device = "auto",
    dry_run: DryRun = False,
    detach: Detach = False,
) -> None:
    """The paper's ablation ladder on one preset: plain MAML, then one MAML++ technique added
    per row (maml, +bnrs+bnwb, +lslr, +msl, +da, +ca = full MAML++), times seeds."""
    from engine.studies import parse_seeds, plan_ablation

    names = [v.strip() for v in variants.split(",") if v.strip()] if variants else None
    set_ = set_ or []
    if list_:
        _list_variants(preset, config, set_, names, leave_one_out)
        return
    plan = plan_ablation(preset, config, set_, parse_seeds(seeds), names, leave_one_out)
    _launch(plan, name, jobs, device, dry_run, detach)


def _list_variants(preset, config, set_, names, leave_one_out) -> None:
    from engine import ablation
    from engine.config import resolve
    from mamlpp_tui.study_tables import variant_matrix

    base = resolve(preset, config, set_).to_dict() if (preset or config or set_) else None
    rows = ablation.select(ablation.ladder(leave_one_out), names, leave_one_out)
    for table in variant_matrix(rows, console.width, base):
        console.print(table)


def _launch(plan, name, jobs: int, device: str, dry_run: bool, detach: bool) -> None:
    from engine.studies import create_study

    study, new = create_study(plan, name)
    if dry_run:
        print_commands(study)
        print(f"study {study.id} {'written' if new else 'exists'} in {study.path}; runs started "
              f"with these commands carry its tag, and `mamlpp study collect {study.id}` picks "
              "them up from the runs folder", file=sys.stderr)
        return
    if not new:
        console.print(f"continuing study {study.id}: finished members are kept")
    run_study(study, jobs, device, detach)


def print_commands(study) -> None:
    for member in study.members:
        print(shlex.join(["mamlpp", *member.args]))


def run_study(study, jobs: int, device: str, detach: bool, rerun_deleted: bool = False) -> None:
    """Run the study in the foreground with a live display, or detached."""
    from engine.studies import member_runs

    if study.is_running():
        raise UserError(f"Study {study.id} is already running (pid {study.runner_pid()}); watch "
                        f"it with `mamlpp watch {study.id}`.")
    member_runs(study, strict=True, rerun_deleted=rerun_deleted)  # bad input: refuse now
    if detach:
        _detach(study, jobs, device, rerun_deleted)
        return
    from engine.study_runner import StudyRunner
    from mamlpp_tui.study_progress import StudyProgressDisplay

    console.print(f"study [bold]{study.id}[/] in {study.path}: {len(study.members)} runs, "
                  f"{jobs} at a time")
    display = StudyProgressDisplay(Console())
    runner = StudyRunner(study, device, jobs, rerun_deleted, on_snapshot=display.snapshot,
                         on_message=display.message)
    try:
        outcome = runner.run()
    finally:
        display.close()
    _print_table(study)
    if outcome.interrupted:
        console.print(f"study {study.id} interrupted; continue it with `mamlpp study resume "
                      f"{study.id}`")
        sys.exit(130)
    if not outcome.ok:
        failed = [f"{label} ({why})" for label, why in outcome.failed]
        what = "; ".join(failed + [f"{label} (stopped)" for label in outcome.stopped])
        print(f"error: study {study.id} did not finish: {what}; retry with `mamlpp study "
              f"resume {study.id}`", file=sys.stderr)
        sys.exit(1)
    console.print(f"study {study.id} finished")


def _detach(study, jobs: int, device: str, rerun_deleted: bool) -> None:
    command = [sys.executable, "-m", "mamlpp_tui", "study", "resume", study.id, "--jobs",
               str(jobs), "--device", device] + (["--rerun-deleted"] if rerun_deleted else [])
    with open(study.log_path, "ab") as log:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if study.is_running() and study.runner_pid() == proc.pid:
            break
        code = proc.poll()
        if code is not None:
            lines = [ln for ln in study.log_path.read_text().splitlines() if ln.strip()]
            last = lines[-1].removeprefix("error: ") if lines else f"see {study.log_path}"
            raise UserError(f"The study process for {study.id} exited at once (code {code}): "
                            f"{last}")
        time.sleep(0.05)
    print(study.id)


def _print_table(study) -> None:
    from engine.studies import member_runs
    from engine.study_results import study_table
    from mamlpp_tui.study_tables import results_table

    table = study_table(study, member_runs(study, strict=False))
    console.print(results_table(table, console.width))


# ---------------------------------------------------------------- study show | resume | collect


@study_app.command("show")
def show(
    study_ref: StudyRef,
    as_json: AsJson = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="The table as CSV.")] = False,
    as_markdown: Annotated[bool, typer.Option("--markdown", help="As a Markdown table.")] = False,
    as_latex: Annotated[bool, typer.Option("--latex", help="As a LaTeX tabular.")] = False,
    commands: Annotated[bool, typer.Option(
        "--commands", help="Print each member's `mamlpp run` command instead.")] = False,
) -> None:
    """The study's result table: one row per variant or grid point, mean ± std over seeds of
    the ensemble test accuracy (ensemble.json) and of the best single epoch's test accuracy (the
    best ensemble member alone), best validation accuracy, each seed's 95% CI, wall time and
    iterations/s. Accuracies in percent (fractions in --json and --csv)."""
    from engine.studies import find_study, member_runs
    from engine.study_results import study_table
    from mamlpp_tui import study_tables as st

    if sum([as_json, as_csv, as_markdown, as_latex, commands]) > 1:
        raise UserError("Give at most one of --json, --csv, --markdown, --latex and --commands.")
    study = find_study(study_ref)
    if commands:
        print_commands(study)
        return
    table = study_table(study, member_runs(study, strict=True))
    if as_json:
        print(json.dumps(table, indent=2))
    elif as_csv:
        sys.stdout.write(st.csv_text(table))
    elif as_markdown:
        sys.stdout.write(st.markdown(table))
    elif as_latex:
        sys.stdout.write(st.latex(table))
    else:
        console.print(st.results_table(table, console.width))


@study_app.command("resume")
def resume(
    study_ref: StudyRef,
    jobs: Jobs = 1,
    device: Device = "auto",
    detach: Detach = False,
    rerun_deleted: RerunDeleted = False,
) -> None:
    """Continue a study: finished members are kept, stopped or killed ones resume from their
    checkpoints, missing ones start."""
    from engine.studies import find_study

    run_study(find_study(study_ref), jobs, device, detach, rerun_deleted)


@study_app.command("collect")
def collect(study_ref: StudyRef, as_json: AsJson = False) -> None:
    """Pick up the study's runs started by hand (from `--dry-run`'s commands, anywhere) from
    the runs folder: check each one's config and link it to the study; then show the table."""
    from engine.studies import find_study, member_runs
    from engine.study_results import study_table
    from mamlpp_tui.study_tables import results_table

    study = find_study(study_ref)
    before = {m.key: study.linked_run(m) for m in study.members}
    members = member_runs(study, strict=True, link=True)
    new = [mr for mr in members if mr.run and before[mr.member.key] != mr.run.run_id]
    table = study_table(study, members)
    if as_json:
        print(json.dumps(dict(table, collected=[mr.run.run_id for mr in new]), indent=2))
        return
    for mr in new:
        console.print(f"collected {mr.member.label}: run {mr.run.run_id} ({mr.state})",
                      markup=False, highlight=False)
    found = sum(1 for mr in members if mr.run)
    console.print(f"study {study.id}: {found} of {len(members)} members have a run, "
                  f"{len(new)} newly collected")
    console.print(results_table(table, console.width))


def studies(as_json: AsJson = False) -> None:
    """List studies with their state and how many of their runs finished."""
    from engine.studies import list_studies, member_runs
    from engine.study_results import study_state
    from mamlpp_tui.study_tables import studies_table

    rows = []
    for study in list_studies():
        row = {"id": study.id, "kind": study.kind, "base": study.base_name,
               "created": study.data.get("created"), "members": len(study.members),
               "finished": 0, "state": None, "error": None}
        try:
            members = member_runs(study, strict=True)
            row["finished"] = sum(1 for mr in members if mr.finished)
            row["state"] = study_state(study, members)
        except UserError as e:
            members = member_runs(study, strict=False)
            row["finished"] = sum(1 for mr in members if mr.finished)
            row["state"], row["error"] = "needs attention", str(e)
        rows.append(row)
    if as_json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        console.print("no studies yet; start one with `mamlpp sweep` or `mamlpp ablate`")
    else:
        console.print(studies_table(rows, console.width))
        for row in rows:
            if row["error"]:
                console.print(f"{row['id']}: {row['error']}", markup=False, highlight=False)


# ---------------------------------------------------------------- run --study, watch STUDY


def new_run(cfg, name: str | None, study: str | None, variant: str | None):
    """`mamlpp run`'s new run directory: plain, or tagged as a study member."""
    from engine.run_store import create_run
    from engine.studies import create_tagged_run

    if study is None and variant is None:
        return create_run(cfg.to_dict(), name)
    if study is None or variant is None:
        raise UserError("Give --study and --variant together; they tag a study member, as the "
                        "commands of `mamlpp sweep/ablate --dry-run` do.")
    return create_tagged_run(study, variant, cfg, name)



def run_or_study(ref: str):
    """What a RUN|STUDY argument names: (RunDir, None) or (None, Study); run ids are looked up
    first. `watch` and `report` both take one."""
    from engine.run_store import find_run, list_runs
    from engine.studies import find_study, study_matches

    ref = ref.strip()
    runs = [r for r in list_runs() if r.run_id.startswith(ref)] if ref else []
    exact_run = next((r for r in runs if r.run_id == ref), None)
    studies_ = study_matches(ref) if ref else []
    exact_study = next((s for s in studies_ if s.id == ref), None)
    if exact_run is None and exact_study is None and runs and studies_:
        raise UserError(f"{ref!r} matches runs ({', '.join(r.run_id for r in runs)}) and studies "
                        f"({', '.join(s.id for s in studies_)}); give more of the id.")
    if exact_run is not None or (runs and exact_study is None):
        return exact_run or find_run(ref), None
    if not studies_:
        raise UserError(f"No run or study matches {ref!r}; list them with `mamlpp runs` and "
                        "`mamlpp studies`.")
    return None, exact_study or find_study(ref)


def watch(ref: str) -> None:
    """`mamlpp watch`: a run's dashboard, or the study view (run ids are looked up first)."""
    run, study = run_or_study(ref)
    if run is not None:
        from mamlpp_tui.dashboard import run_dashboard

        run_dashboard(run.path)
        return
    from mamlpp_tui.dashboard.study_app import run_study_dashboard

    run_study_dashboard(study)
