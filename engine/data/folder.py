"""`mamlpp data import folder PATH --name NAME`: any image-folder dataset into the cache.

PATH holds one sub-folder per class (images anywhere below it), or exactly `train/`, `val/`
(or `validation/`) and `test/`, each holding class folders, which are then used as given.

- Every file is decoded (anything Pillow reads); files that are not readable images are
  skipped and counted. Images are converted to RGB (`--channels 3`) or grayscale (1) and made
  `size` x `size` keeping the aspect ratio by a centre crop (`engine.preprocess`, method
  "center_crop": the centred square cropped, the longer side's edges cut, then LANCZOS).
- Classes are split by class, never by image: the usable classes (sorted names) are put in the
  order of sha256("<seed>/<class name>") (a seeded shuffle any tool can reproduce, independent
  of the order files are found in), then cut by the fractions (val = round(f_val * n),
  test = round(f_test * n), train the rest); or taken from a file (`--splits-from`); or as the
  folders give them. Seed, fractions and method are recorded in the manifest (`class_split`).
- Classes with fewer than 2 readable images can never form a task: they are left out with a
  warning. Classes with fewer images than a run's shots + queries are left out of that run's
  tasks by the sampler, with a warning when the run starts (`exclusion_notes`).
- The normalisation is the per-channel mean and std (ddof 0) of the train split's pixels in
  [0, 1], recorded in the manifest and applied in training, evaluation, predict and exports.
- Storage as every cache (uint8, memory-mapped safetensors, content hash, manifest with
  counts); a split whose classes have different numbers of images is kept as
  [images, C, H, W] with the per-class counts. Decoding streams through a scratch file next to
  the cache, so memory stays small; the user's files are only read.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.data.cache import SPLITS, CacheWriter, FewShotDataset, load_cached, resolve_root
from engine.data.progress import Reporter
from engine.errors import UserError
from engine.preprocess import ImageReadError, Preprocessing, read_file

BUILTIN = ("omniglot", "miniimagenet", "quickstart")
NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_RESERVED = {"true", "false", "inf", "nan", "folder"}
DEFAULT_SPLIT = (0.64, 0.16, 0.20)
MIN_IMAGES = 2  # a class needs at least one support and one query image
_SPLIT_DIRS = {"train": "train", "val": "val", "validation": "val", "test": "test"}


def check_name(name: str) -> str:
    """A name usable as `data.dataset` (a bare word in `--set data.dataset=NAME`)."""
    if name in BUILTIN:
        raise UserError(f"--name {name} is a built-in dataset; choose another name for your own "
                        "data.")
    if not NAME_RE.match(name or "") or name in _RESERVED:
        raise UserError(f"--name {name!r} is not a usable dataset name: use lowercase letters, "
                        "digits, '-' and '_', starting with a letter (e.g. --name birds).")
    return name


def parse_split(text: str) -> tuple[float, float, float]:
    """`--split a,b,c` -> three fractions (train, val, test) that sum to 1."""
    try:
        parts = tuple(float(v) for v in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or any(not math.isfinite(v) or v < 0 for v in parts) \
            or abs(sum(parts) - 1) > 1e-6 or parts[1] == 0 or parts[2] == 0:
        raise UserError(f"--split {text!r} must be three fractions train,val,test that sum to 1, "
                        "val and test above 0 (e.g. --split 0.64,0.16,0.20).")
    return parts  # type: ignore[return-value]


@dataclass
class _Class:
    name: str
    files: list[Path]
    split: str | None = None  # given by the folder layout
    rows: list[int] | None = None  # scratch rows of its readable images


def _is_hidden(p: Path) -> bool:
    return p.name.startswith(".") or p.name == "__MACOSX"


def _image_files(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(Path(d)))
        out += [Path(dirpath) / f for f in sorted(filenames) if not _is_hidden(Path(f))]
    return sorted(out, key=lambda p: p.relative_to(folder).as_posix())


def _subfolders(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not _is_hidden(p))
    except OSError as e:
        raise UserError(f"Cannot read the folder {path}: {e.strerror or e}.") from None


def find_classes(path: Path) -> tuple[list[_Class], bool]:
    """(classes, whether PATH gives the split as train/ val/ test/ folders)."""
    subs = _subfolders(path)
    if not subs:
        raise UserError(f"{path} holds no class folders; it needs one sub-folder per class "
                        "(or train/, val/ and test/ folders of class folders).")
    kinds = {p.name.lower(): p for p in subs}
    split_dirs = {k for k in kinds if k in _SPLIT_DIRS}
    if split_dirs and split_dirs == set(kinds):
        have = {_SPLIT_DIRS[k] for k in split_dirs}
        if have != set(SPLITS) or len(split_dirs) != 3:
            missing = [s for s in SPLITS if s not in have]
            lacking = ("no " + " or ".join(m + "/" for m in missing) if missing
                       else "two val folders")
            raise UserError(f"{path} has {', '.join(sorted(k + '/' for k in split_dirs))} but "
                            f"{lacking}; give train/, val/ and test/ folders of class folders, "
                            "or one folder per class.")
        classes, seen = [], {}
        for key in sorted(split_dirs, key=lambda k: SPLITS.index(_SPLIT_DIRS[k])):
            split = _SPLIT_DIRS[key]
            for folder in _subfolders(kinds[key]):
                if folder.name in seen:
                    raise UserError(f"Class {folder.name} is in both the {seen[folder.name]} "
                                    f"and the {split} folder of {path}; splits must not share "
                                    "classes.")
                seen[folder.name] = split
                classes.append(_Class(folder.name, _image_files(folder), split))
        return classes, True
    return [_Class(p.name, _image_files(p)) for p in subs], False


def seeded_order(names: Sequence[str], seed: int) -> list[str]:
    """`names` in the order of sha256(f"{seed}/{name}")."""
    return sorted(sorted(names), key=lambda n: hashlib.sha256(f"{seed}/{n}".encode()).digest())


def split_by_fractions(names: Sequence[str], fractions: Sequence[float],
                       seed: int) -> dict[str, list[str]]:
    n = len(names)
    n_val, n_test = round(fractions[1] * n), round(fractions[2] * n)
    n_train = n - n_val - n_test
    order = seeded_order(names, seed)
    cut = {"train": order[:n_train], "val": order[n_train:n_train + n_val],
           "test": order[n_train + n_val:]}
    return {s: sorted(v) for s, v in cut.items()}


def read_splits_file(path: Path) -> dict[str, list[str]]:
    """train/val/test class lists from JSON ({"train": [...], ...} or a mamlpp manifest) or
    CSV lines `class,split`."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"Cannot read the splits file {path}: "
                        f"{getattr(e, 'strerror', None) or e}.") from None
    bad = UserError(f"{path} is not a splits file: give JSON {{\"train\": [classes], \"val\": "
                    "[...], \"test\": [...]}}, a mamlpp manifest.json, or CSV lines class,split.")
    data: Any = None
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            raise bad from None
        if isinstance(data, dict) and isinstance(data.get("splits"), dict):  # a manifest
            data = {s: (v or {}).get("class_names") for s, v in data["splits"].items()
                    if isinstance(v, dict)}
        aliases = {"validation": "val"}
        out: dict[str, list[str]] = {}
        for key, value in (data or {}).items():
            split = aliases.get(key, key)
            if split not in SPLITS or not isinstance(value, list) \
                    or not all(isinstance(v, str) for v in value):
                raise bad
            out[split] = list(value)
    else:
        out = {s: [] for s in SPLITS}
        for i, row in enumerate(csv.reader(io.StringIO(text)), start=1):
            if not row or not any(c.strip() for c in row):
                continue
            if i == 1 and [c.strip().lower() for c in row[:2]] == ["class", "split"]:
                continue
            split = _SPLIT_DIRS.get(row[1].strip().lower()) if len(row) >= 2 else None
            if split is None:
                raise UserError(f"Line {i} of {path} is not class,split with split train, val "
                                f"or test: {row!r}.")
            out[split].append(row[0].strip())
    if set(out) != set(SPLITS) or not all(out.values()):
        raise UserError(f"{path} must list classes for each of train, val and test.")
    seen: dict[str, str] = {}
    for split in SPLITS:
        for name in out[split]:
            if name in seen and seen[name] != split:
                raise UserError(f"{path} puts class {name} in both {seen[name]} and {split}.")
            seen[name] = split
    return out


def _checked_counts(split_names: dict[str, list[str]], label: str) -> None:
    small = {s: len(v) for s, v in split_names.items() if len(v) < 2}
    if small:
        got = ", ".join(f"{len(split_names[s])} {s}" for s in SPLITS)
        raise UserError(f"{label} gives {got} classes; every split needs at least 2 classes "
                        "(a task has at least 2 ways): add classes or change the split.")


def import_folder(path: Path, name: str, size: int = 84, channels: int = 3,
                  split: Sequence[float] | None = None, splits_from: Path | None = None,
                  seed: int = 0, root: Path | None = None,
                  reporter: Reporter | None = None) -> FewShotDataset:
    """Import PATH as dataset `name` (see the module docstring); returns the cached dataset."""
    reporter = reporter or Reporter()
    check_name(name)
    if not 8 <= size <= 1024:
        raise UserError(f"--size {size} must be between 8 and 1024 pixels.")
    if channels not in (1, 3):
        raise UserError(f"--channels {channels} must be 3 (colour) or 1 (grayscale).")
    if split is not None and splits_from is not None:
        raise UserError("Give either --split or --splits-from, not both.")
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UserError(f"{path} is not a folder; `mamlpp data import folder` takes a folder of "
                        "class folders.")
    classes, given = find_classes(path)
    if given and (split is not None or splits_from is not None):
        raise UserError(f"{path} already splits its classes into train/, val/ and test/ "
                        "folders, which are used as given; drop --split/--splits-from.")
    fractions = tuple(split) if split is not None else DEFAULT_SPLIT
    wanted = read_splits_file(splits_from) if splits_from is not None else None
    prep = Preprocessing("center_crop", size, channels, 255, None)
    root_path = resolve_root(root)
    try:
        root_path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"Cannot create the data cache {root_path}: {e.strerror or e}; set "
                        "MAMLPP_HOME to a writable folder.") from None
    scratch_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-{os.getpid()}-scan-",
                                        dir=root_path))
    try:
        return _import(path, name, prep, classes, given, fractions, wanted, splits_from, seed,
                       root, reporter, scratch_dir)
    finally:
        shutil.rmtree(scratch_dir, ignore_errors=True)


def _import(path: Path, name: str, prep: Preprocessing, classes: list[_Class], given: bool,
            fractions: tuple[float, ...], wanted: dict[str, list[str]] | None,
            splits_from: Path | None, seed: int, root: Path | None, reporter: Reporter,
            scratch_dir: Path) -> FewShotDataset:
    files = [f for c in classes for f in c.files]
    if not files:
        raise UserError(f"The class folders of {path} hold no files.")
    scratch = np.lib.format.open_memmap(scratch_dir / "images.npy", mode="w+", dtype=np.uint8,
                                        shape=(len(files), *prep.image_shape))
    skipped: list[str] = []
    converted = 0
    row = 0
    reporter.start(f"read {name}", len(files), unit="images")
    for c in classes:
        c.rows = []
        for f in c.files:
            try:
                pixels, conv = prep.prepare(read_file(f))
            except ImageReadError:
                skipped.append(f.relative_to(path).as_posix())
            else:
                scratch[row] = pixels
                c.rows.append(row)
                converted += conv
                row += 1
            reporter.advance(1)
    reporter.done()
    if row == 0:
        raise UserError(f"None of the {len(files)} files under {path} is a readable image; "
                        "nothing to import.")
    notes = []
    if skipped:
        shown = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        notes.append(f"skipped {len(skipped)} unreadable or non-image file"
                     f"{'s' if len(skipped) > 1 else ''} ({shown})")
    if converted:
        target = "grayscale" if prep.channels == 1 else "RGB"
        notes.append(f"converted {converted} image{'s' if converted > 1 else ''} to {target} "
                     f"(--channels {prep.channels})")
    too_small = [c for c in classes if len(c.rows or []) < MIN_IMAGES]
    if too_small:
        shown = ", ".join(f"{c.name} ({len(c.rows or [])})" for c in too_small[:5])
        more = f" and {len(too_small) - 5} more" if len(too_small) > 5 else ""
        notes.append(f"left out {len(too_small)} class{'es' if len(too_small) > 1 else ''} with "
                     f"fewer than {MIN_IMAGES} readable images: {shown}{more}")
    usable = {c.name: c for c in classes if len(c.rows or []) >= MIN_IMAGES}
    label = str(path)
    if given:
        split_names = {s: sorted(n for n, c in usable.items() if c.split == s) for s in SPLITS}
        method = {"method": "folders", "description": "as given by the train/, val/ and test/ "
                  "folders"}
    elif wanted is not None:
        listed = {n for v in wanted.values() for n in v}
        unknown = sorted(listed - {c.name for c in classes})
        if unknown:
            raise UserError(f"The splits file {splits_from} lists class {unknown[0]}, which is "
                            f"not a class folder of {path}"
                            + (f" ({len(unknown)} such classes)." if len(unknown) > 1 else "."))
        unlisted = sorted(set(usable) - listed)
        if unlisted:
            notes.append(f"left out {len(unlisted)} class{'es' if len(unlisted) > 1 else ''} "
                         f"the splits file does not list: {', '.join(unlisted[:5])}"
                         + (", ..." if len(unlisted) > 5 else ""))
        split_names = {s: sorted(n for n in wanted[s] if n in usable) for s in SPLITS}
        label = f"The splits file {splits_from}"
        method = {"method": "file", "description": f"as listed in {splits_from}",
                  "file": str(Path(splits_from).expanduser().resolve())}
    else:
        split_names = split_by_fractions(sorted(usable), fractions, seed)
        label = (f"{path} has {len(usable)} usable classes; the split "
                 f"{','.join(f'{v:g}' for v in fractions)}")
        method = {"method": "seeded", "seed": seed, "fractions": list(fractions),
                  "description": f"classes in sha256(\"{seed}/<class>\") order, cut "
                                 f"{','.join(f'{v:g}' for v in fractions)} (val and test "
                                 "rounded, train the rest)"}
    _checked_counts(split_names, label)
    for note in notes:
        reporter.note(f"warning: {note}.")
    sizes: dict[str, Any] = {}
    for s in SPLITS:
        counts = [len(usable[n].rows) for n in split_names[s]]
        sizes[s] = (len(counts), counts[0]) if len(set(counts)) == 1 else counts
    total = sum(len(usable[n].rows) for s in SPLITS for n in split_names[s])
    mean, std = _train_stats(scratch, [r for n in split_names["train"] for r in usable[n].rows])
    with CacheWriter(name, sizes, prep.image_shape, root) as writer:
        reporter.start(f"write {name}", total, unit="images")
        for s in SPLITS:
            for ci, n in enumerate(split_names[s]):
                rows = usable[n].rows
                writer.write(s, ci, 0, scratch[rows])
                reporter.advance(len(rows))
        reporter.done()
        writer.commit({
            "pixel_max": 255,
            "normalize": {"mean": mean, "std": std},
            "train_augment": None,
            "preprocess": {k: v for k, v in prep.to_dict().items()
                           if k not in ("normalize", "pixel_max")},
            "source": {"kind": "folder", "path": str(path.resolve()),
                       "layout": "train/val/test folders" if given else "class folders"},
            "class_names": split_names,
            "class_split": method,
            "skipped_files": len(skipped),
            "excluded_classes": sorted(c.name for c in too_small)
            + ([n for n in sorted(set(usable) - {x for v in split_names.values() for x in v})]),
            "details": {
                "pixels": f"uint8 {'RGB' if prep.channels == 3 else 'grayscale'} 0..255, "
                          f"{list(prep.image_shape)}",
                "resize": prep.describe().split(", pixels")[0],
                "normalize": "per-channel mean and std (ddof 0) of the train split in [0, 1]",
                "order": "classes sorted by name; images by path within their class folder",
            },
        })
    del scratch
    dataset = load_cached(name, root)
    assert dataset is not None
    return dataset


def _train_stats(scratch: np.ndarray, rows: list[int]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (ddof 0) of the given images' pixels scaled to [0, 1]."""
    c = scratch.shape[1]
    total = np.zeros(c, np.float64)
    squares = np.zeros(c, np.float64)
    n = 0
    for start in range(0, len(rows), 256):
        block = scratch[rows[start:start + 256]].astype(np.float64) / 255.0
        total += block.sum(axis=(0, 2, 3))
        squares += (block * block).sum(axis=(0, 2, 3))
        n += block.shape[0] * block.shape[2] * block.shape[3]
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean * mean, 0.0))
    std = np.where(std > 1e-6, std, 1.0)  # a constant channel is left unscaled
    return [float(v) for v in mean], [float(v) for v in std]


def exclusion_notes(manifest: dict[str, Any], shots: int, queries: int) -> list[str]:
    """Warnings for a run's start: per split, the classes that have fewer images than
    shots + queries and so are left out of its tasks (datasets with varying counts)."""
    need = shots + queries
    notes = []
    for split, info in (manifest.get("splits") or {}).items():
        counts = info.get("counts")
        if not counts:
            continue
        names = info.get("class_names") or [str(i) for i in range(len(counts))]
        small = [f"{n} ({k})" for n, k in zip(names, counts) if k < need]
        if small:
            shown = ", ".join(small[:5]) + (f" and {len(small) - 5} more" if len(small) > 5
                                             else "")
            notes.append(f"{len(small)} of the {len(counts)} {split} classes of "
                         f"{manifest.get('name')} have fewer than {need} images (data.shots + "
                         f"data.queries) and are left out of its tasks: {shown}")
    return notes


def run_data_notes(config) -> list[str]:  # noqa: ANN001 - engine.config.Config
    """Before a run starts, for an imported dataset: its image shape checked against the
    network (a ConfigError naming model.stages), enough classes with shots + queries images in
    every split (a ConfigError naming the keys), and the warnings `exclusion_notes` gives."""
    from engine.config import ConfigError
    from engine.data.cache import read_manifest

    if config.data.dataset in BUILTIN:
        return []
    config.image_shape  # noqa: B018 - reads the manifest and checks model.stages
    manifest = read_manifest(config.data.dataset) or {}
    d = config.data
    need = d.shots + d.queries
    for split, info in (manifest.get("splits") or {}).items():
        counts = info.get("counts") or [info["per_class"]] * info["classes"]
        usable = sum(n >= need for n in counts)
        if usable < d.ways:
            raise ConfigError(
                f"data.ways = {d.ways} with data.shots + data.queries = {need} needs {d.ways} "
                f"classes of {need} images or more in every split, but the {split} split of "
                f"{d.dataset} has {usable} (its largest class has {max(counts)} images); lower "
                "data.queries, data.shots or data.ways.")
    return exclusion_notes(manifest, d.shots, d.queries)
