"""`mamlpp data ...`: fetch, import and inspect cached datasets."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from engine.data.progress import LineReporter, Reporter
from engine.errors import UserError

data_app = typer.Typer(help="Fetch, import and inspect datasets.", no_args_is_help=True)


class RichReporter(Reporter):
    """A rich progress bar per job (bytes for downloads, counts otherwise)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.task: TaskID | None = None

    def start(self, description: str, total: int | None = None, unit: str = "items") -> None:
        self.done()
        if unit == "bytes":
            columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                       TransferSpeedColumn(), TimeRemainingColumn()]
        else:
            columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn(unit), TimeElapsedColumn(), TimeRemainingColumn()]
        self.progress = Progress(*columns, console=self.console)
        self.progress.start()
        self.task = self.progress.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task, n)

    def done(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
            self.task = None

    def note(self, message: str) -> None:
        self.console.print(message, markup=False, highlight=False)


def _reporter() -> Reporter:
    console = Console()
    if console.is_terminal:
        return RichReporter(console)
    return LineReporter(sys.stdout)


def _summary(dataset, seconds: float) -> str:  # noqa: ANN001 - FewShotDataset
    counts = dataset.counts()
    parts = ", ".join(f"{s} {c['classes']} classes x {c['per_class']}"
                      + (f"-{c['per_class_max']}" if "per_class_max" in c else "")
                      for s, c in counts.items())
    total = sum(c["images"] for c in counts.values())
    c, h, w = dataset.image_shape
    return (f"{dataset.name} cached in {dataset.path}: {parts} ({total:,} images, {c}x{h}x{w}) "
            f"in {seconds:.1f} s")


def _done(dataset, t0: float) -> None:  # noqa: ANN001
    print(_summary(dataset, time.monotonic() - t0))


@data_app.command("fetch")
def fetch(
    name: str = typer.Argument(..., help="omniglot (or quickstart, to generate it now)."),
    from_: list[Path] = typer.Option(  # noqa: B008
        None, "--from", help="Local images_background/images_evaluation zips or folders, "
        "or a folder holding them (repeatable); verified by content instead of downloaded."),
    force: bool = typer.Option(False, "--force", help="Fetch and convert again if cached."),
) -> None:
    """Download (or take local files), verify and cache a dataset."""
    from engine.data.cache import read_manifest
    from engine.data.omniglot import fetch_omniglot
    from engine.data.quickstart import build_quickstart, quickstart_is_current

    t0 = time.monotonic()
    if name == "omniglot":
        if not from_ and not force and read_manifest("omniglot") is not None:
            from engine.data.cache import load_cached
            from engine.data.splits import refresh_omniglot

            if refresh_omniglot(reporter=_reporter()):  # it had mamlpp's previous split
                _done(load_cached("omniglot"), t0)
                return
            dataset = load_cached("omniglot")
            print(f"omniglot is already cached in {dataset.path}; use --force to fetch again.")
            return
        _done(fetch_omniglot(from_paths=from_ or None, reporter=_reporter()), t0)
    elif name == "quickstart":
        if from_:
            raise UserError("quickstart is generated, it takes no --from.")
        if force or not quickstart_is_current():
            _done(build_quickstart(reporter=_reporter()), t0)
        else:
            from engine.data.cache import load_cached

            print(f"quickstart is already cached in {load_cached('quickstart').path}.")
    elif name == "miniimagenet":
        raise UserError("mini-ImageNet cannot be downloaded (ImageNet's terms); import your copy "
                        "with `mamlpp data import miniimagenet PATH`.")
    else:
        raise UserError(f"Unknown dataset {name!r}; `mamlpp data fetch` takes omniglot or "
                        "quickstart.")


@data_app.command("import")
def import_(
    name: str = typer.Argument(..., help="miniimagenet, omniglot, or folder (your own images: "
                               "one sub-folder per class)."),
    path: Path = typer.Argument(..., help="Folder, archive or pickle folder to import."),  # noqa: B008
    any_split: bool = typer.Option(
        False, "--any-split",
        help="Accept a class split other than mini-ImageNet's 64/16/20."),
    dataset_name: str = typer.Option(None, "--name", help="folder: the dataset's name (train "
                                     "on it with --set data.dataset=NAME)."),
    size: int = typer.Option(None, "--size", help="folder: image side in pixels (default 84); "
                             "aspect kept by a centre crop."),
    channels: int = typer.Option(None, "--channels", help="folder: 3 (RGB, default) or 1 "
                                 "(grayscale)."),
    split: str = typer.Option(None, "--split", help="folder: train,val,test fractions of the "
                              "classes (default 0.64,0.16,0.20)."),
    splits_from: Path = typer.Option(None, "--splits-from", help="folder: take the class "  # noqa: B008
                                     "split from a file (JSON train/val/test lists, a mamlpp "
                                     "manifest.json, or CSV class,split)."),
    seed: int = typer.Option(None, "--seed", min=0, help="folder: seed of the class split "
                             "(default 0)."),
) -> None:
    """Import a dataset from local files (never modified) into the cache."""
    from engine.data.miniimagenet import import_miniimagenet
    from engine.data.omniglot import fetch_omniglot

    t0 = time.monotonic()
    folder_options = {"--name": dataset_name, "--size": size, "--channels": channels,
                      "--split": split, "--splits-from": splits_from, "--seed": seed}
    if name == "folder":
        from engine.data.folder import import_folder, parse_split

        if any_split:
            raise UserError("--any-split is for miniimagenet; a folder import takes --split.")
        if dataset_name is None:
            raise UserError("Name the dataset: `mamlpp data import folder PATH --name NAME`.")
        _done(import_folder(path, dataset_name, 84 if size is None else size,
                            3 if channels is None else channels,
                            parse_split(split) if split is not None else None, splits_from,
                            seed or 0, reporter=_reporter()), t0)
        print(f"train on it with `mamlpp run --preset PRESET --set data.dataset={dataset_name}`")
        return
    given = [k for k, v in folder_options.items() if v is not None]
    if given:
        raise UserError(f"{given[0]} is an option of `mamlpp data import folder`, not of "
                        f"{name}.")
    if name == "miniimagenet":
        _done(import_miniimagenet(path, reporter=_reporter(), any_split=any_split), t0)
    elif name == "omniglot":
        _done(fetch_omniglot(from_paths=[path], reporter=_reporter()), t0)
    elif name == "quickstart":
        raise UserError("quickstart is built in and needs no import; it is generated on first "
                        "use.")
    else:
        raise UserError(f"Unknown dataset {name!r}; `mamlpp data import` takes miniimagenet, "
                        "omniglot or folder.")


@data_app.command("info")
def info(
    name: str = typer.Argument(None, help="Only this dataset."),
    classes: bool = typer.Option(False, "--classes",
                                 help="List the class names of each split (needs NAME)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List the cached datasets with their counts per split and their class split."""
    from engine.data.datasets import dataset_classes, dataset_info

    if classes:
        if name is None:
            raise UserError("--classes lists one dataset's classes; name it, e.g. "
                            "`mamlpp data info omniglot --classes`.")
        listing = dataset_classes(name)
        if as_json:
            print(json.dumps(listing, indent=2))
            return
        print(f"{name}: {listing['split']['description']} (digest {listing['split']['digest']})")
        for split, names in listing["splits"].items():
            print(f"{split} ({len(names)} classes):")
            for n in names:
                print(f"  {n}")
        return
    report = dataset_info()
    if name is not None:
        report["datasets"] = [d for d in report["datasets"] if d["name"] == name]
        report["missing"] = [m for m in report["missing"] if m["name"] == name]
        if not report["datasets"] and not report["missing"]:
            dataset_classes(name)  # raises: no such dataset, naming the cached ones
    if as_json:
        print(json.dumps(report, indent=2))
        return
    from mamlpp_tui.tables import Column, fitted_table

    console = Console()
    rows = []
    for d in report["datasets"]:
        if "error" in d:
            rows.append([d["name"], "damaged", "", "", ""])
            continue
        source = d.get("source") or {}
        about = [d["name"], "x".join(map(str, d["image_shape"])),
                 f"{d['bytes'] / 1e6:.1f} MB", source.get("layout") or source.get("kind", "")]
        splits = list(d["splits"].items())
        for i in range(max(len(splits), len(about))):
            split, c = splits[i] if i < len(splits) else ("", None)
            rows.append([about[i] if i < len(about) else "", split,
                         "" if c is None else str(c["classes"]),
                         "" if c is None else str(c["per_class"])
                         + (f"-{c['per_class_max']}" if "per_class_max" in c else ""),
                         "" if c is None else f"{c['images']:,}"])
        rows.append(None)  # a line between datasets
    table = fitted_table(
        [Column("dataset", identifying=True), Column("split", identifying=True),
         Column("classes", priority=3), Column("per class", priority=1),
         Column("images", priority=2)],
        rows, console.width, title=f"datasets in {report['root']}")
    if rows:
        console.print(table)
    for d in report["datasets"]:
        if "error" in d:
            console.print(d["error"], markup=False, highlight=False)
        else:
            console.print(f"{d['name']} classes: {d['split']['description']}.", markup=False,
                          highlight=False)
    for m in report["missing"]:
        how = ("generated on first use" if m["name"] == "quickstart"
               else f"get it with `{m['command']}`")
        console.print(f"{m['name']}: not cached; {how}.", markup=False, highlight=False)
