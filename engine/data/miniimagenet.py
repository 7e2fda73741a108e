"""mini-ImageNet import: three layouts users have, detected automatically, one cache format.

(a) folders   `[<prefix>/]{train,val,test}/<wnid>/*.jpg` (the MAML++ reference layout,
              `mini_imagenet_full_size/`), in a folder or a .zip/.tar/.tar.gz of it;
(b) csv       `images/<file>.jpg` plus `train.csv`, `val.csv`, `test.csv` with the header
              `filename,label` (label = wnid), Ravi & Larochelle's layout;
(c) pickle    `mini-imagenet-cache-{train,val|validation,test}.pkl`, each a dict with
              `image_data` (uint8 N x H x W x 3) and `class_dict` (wnid -> row indices),
              read with a restricted unpickler that refuses anything but plain data.

All three give the same cache for the same images: classes of a split sorted by wnid, the
images of a class sorted by file name (layouts a and b) or in `class_dict` order (c), RGB
uint8 [3, 84, 84] (resized with PIL LANCZOS when another size). The import streams: images are
decoded one at a time and written at their place in the cache file, so memory stays small
(a pickle file is the exception: one split's array is in memory while its split is written).
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from engine.data.cache import SPLITS, CacheWriter, FewShotDataset, load_cached
from engine.data.images import decode_image
from engine.data.progress import Reporter
from engine.data.safe_pickle import UnsafePickleError, safe_load
from engine.data.sources import FolderSource, Source, open_source
from engine.errors import UserError

IMAGE_SIZE = 84
STANDARD_SPLIT = {"train": 64, "val": 16, "test": 20}
STANDARD_PER_CLASS = 600
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

_IMG = r"[^/]+\.(?:jpe?g|png)"
_SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "test": "test"}
_FOLDER_RE = re.compile(rf"^((?:[^/]+/)*?)(train|val|validation|test)/([^/]+)/({_IMG})$",
                        re.IGNORECASE)
_CSV_RE = re.compile(r"^((?:[^/]+/)*?)(train|val|validation|test)\.csv$", re.IGNORECASE)
_PKL_RE = re.compile(r"^((?:[^/]+/)*?)mini-imagenet-cache-(train|val|validation|test)\.pkl$",
                     re.IGNORECASE)
EXPECTED = ("train/, val/ and test/ folders of <wnid>/*.jpg (optionally inside "
            "mini_imagenet_full_size/ or a .zip/.tar/.tar.gz), or images/ with train.csv, val.csv "
            "and test.csv, or mini-imagenet-cache-{train,val,test}.pkl files")


@dataclass
class Plan:
    layout: str  # "folders" | "csv" | "pickle"
    # folders/csv: split -> [(wnid, [file names in the source])]; pickle: split -> pickle path
    classes: dict[str, list[tuple[str, list[str]]]] = field(default_factory=dict)
    pickles: dict[str, Path] = field(default_factory=dict)


def _by_split(matches: dict[str, dict[str, str]], what: str,
              label: str) -> tuple[str, dict[str, str]]:
    """prefix -> {split: name}: pick the one prefix that has all three splits."""
    complete = {p: d for p, d in matches.items() if set(d) == set(SPLITS)}
    if len(complete) > 1:
        raise UserError(f"{label} holds more than one mini-ImageNet copy ({what} under "
                        f"{', '.join(repr(p or './') for p in sorted(complete))}); "
                        "point to one of them.")
    if not complete:
        prefix, found = max(matches.items(), key=lambda kv: len(kv[1]))
        missing = [s for s in SPLITS if s not in found]
        raise UserError(f"{label} has {what} for {', '.join(sorted(found))} but not for "
                        f"{', '.join(missing)} (under {prefix or './'}); mini-ImageNet needs "
                        "train, val and test.")
    return next(iter(complete.items()))


def detect(source: Source) -> Plan:
    """Which layout `source` holds, with its classes and files (a UserError when none)."""
    names = source.names()
    label = source.label
    # (a) folders
    folders: dict[str, dict[str, dict[str, list[str]]]] = {}
    for name in names:
        m = _FOLDER_RE.match(name)
        if m:
            split = _SPLIT_NAMES[m.group(2).lower()]
            folders.setdefault(m.group(1), {}).setdefault(split, {}).setdefault(
                m.group(3), []).append(name)
    if folders:
        marks = {p: {s: s for s in d} for p, d in folders.items()}
        prefix, _ = _by_split(marks, "class folders", label)
        plan = Plan("folders")
        for split in SPLITS:
            by_class = folders[prefix][split]
            plan.classes[split] = [(w, sorted(by_class[w])) for w in sorted(by_class)]
        if isinstance(source, FolderSource):
            _check_empty_class_folders(source, prefix, plan)
        return plan
    # (b) csv
    csvs: dict[str, dict[str, str]] = {}
    for name in names:
        m = _CSV_RE.match(name)
        if m:
            csvs.setdefault(m.group(1), {})[_SPLIT_NAMES[m.group(2).lower()]] = name
    if csvs:
        prefix, files = _by_split(csvs, "csv files", label)
        return _csv_plan(source, prefix, files, set(names))
    # (c) pickles
    pickles: dict[str, dict[str, str]] = {}
    for name in names:
        m = _PKL_RE.match(name)
        if m:
            pickles.setdefault(m.group(1), {})[_SPLIT_NAMES[m.group(2).lower()]] = name
    if pickles:
        if not isinstance(source, FolderSource):
            raise UserError(f"{label} holds mini-imagenet-cache pickles inside an archive; "
                            "extract them and import their folder.")
        _, files = _by_split(pickles, "pickle files", label)
        return Plan("pickle", pickles={s: source.file_path(n) for s, n in files.items()})
    raise UserError(f"{label} does not look like mini-ImageNet: expected {EXPECTED}.")


def _check_empty_class_folders(source: FolderSource, prefix: str, plan: Plan) -> None:
    for split_dir in sorted((source.path / prefix).iterdir()):
        split = _SPLIT_NAMES.get(split_dir.name.lower())
        if split is None or not split_dir.is_dir():
            continue
        have = {w for w, _ in plan.classes[split]}
        for class_dir in sorted(split_dir.iterdir()):
            if class_dir.is_dir() and not class_dir.name.startswith(".") \
                    and class_dir.name not in have:
                raise UserError(f"The class folder {class_dir} has no images (.jpg/.png).")


def _csv_plan(source: Source, prefix: str, files: dict[str, str], names: set[str]) -> Plan:
    plan = Plan("csv")
    for split in SPLITS:
        name = files[split]
        where = f"{name} in {source.label}"
        try:
            text = source.read(name).decode("utf-8-sig")
        except UnicodeDecodeError:
            raise UserError(f"{where} is not a text file.") from None
        rows = list(csv.reader(io.StringIO(text)))
        rows = [r for r in rows if r and any(c.strip() for c in r)]
        if not rows or [c.strip().lower() for c in rows[0][:2]] != ["filename", "label"]:
            raise UserError(f"{where} must start with the header filename,label.")
        if len(rows) == 1:
            raise UserError(f"{where} lists no images.")
        by_class: dict[str, list[str]] = {}
        for i, row in enumerate(rows[1:], start=2):
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise UserError(f"Line {i} of {where} is not filename,label: {row!r}.")
            image = f"{prefix}images/{row[0].strip()}"
            if image not in names:
                raise UserError(f"{where} lists {row[0].strip()} (line {i}), but "
                                f"{prefix}images/ has no such file.")
            by_class.setdefault(row[1].strip(), []).append(image)
        plan.classes[split] = [(w, sorted(set(by_class[w]))) for w in sorted(by_class)]
    return plan


def _check_classes(counts: dict[str, int], label: str, any_split: bool) -> None:
    if any_split or counts == STANDARD_SPLIT:
        return
    got = ", ".join(f"{counts[s]} {s}" for s in SPLITS)
    raise UserError(f"{label} has {got} classes, but mini-ImageNet's standard split is "
                    "64 train, 16 val and 20 test; pass --any-split to import it anyway.")


def _check_per_class(split: str, sizes: dict[str, int], label: str) -> int:
    common, _ = Counter(sizes.values()).most_common(1)[0]
    for wnid, n in sizes.items():
        if n != common:
            raise UserError(f"Class {wnid} of the {split} split in {label} has {n} images, but "
                            f"the other classes have {common}; every class of a split needs "
                            "the same number of images.")
    return common


def _check_disjoint(classes: dict[str, list[str]], label: str) -> None:
    seen: dict[str, str] = {}
    for split in SPLITS:
        for wnid in classes[split]:
            if wnid in seen:
                raise UserError(f"Class {wnid} is in both the {seen[wnid]} and the {split} "
                                f"split of {label}; splits must not share classes.")
            seen[wnid] = split


def decode_rgb(data: bytes, where: str) -> np.ndarray:
    """Encoded image -> uint8 [3, 84, 84] (converted to RGB, resized with LANCZOS if needed)."""
    rgb = decode_image(data, where, "RGB")
    if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
        rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def _resize_hwc(images: np.ndarray) -> np.ndarray:
    """uint8 [k, H, W, 3] -> [k, 3, 84, 84]."""
    if images.shape[1:3] == (IMAGE_SIZE, IMAGE_SIZE):
        return images.transpose(0, 3, 1, 2)
    out = np.empty((images.shape[0], 3, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    for i, image in enumerate(images):
        small = Image.fromarray(image).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
        out[i] = np.asarray(small).transpose(2, 0, 1)
    return out


def load_pickle(path: Path) -> tuple[np.ndarray, dict[str, list[int]]]:
    """A mini-imagenet-cache pickle's (image_data [N,H,W,3] uint8, class_dict), safely."""
    try:
        with open(path, "rb") as f:
            data = safe_load(f)
    except UnsafePickleError as e:
        raise UserError(f"{path} is not a plain data pickle: it refers to {e}, which could run "
                        "code, so it was refused and nothing in it was run.") from None
    except MemoryError:
        raise UserError(f"Not enough memory to read {path}.") from None
    except OSError as e:
        raise UserError(f"Cannot read {path}: {e.strerror or e}.") from None
    except Exception as e:  # truncated or garbled pickles raise many kinds of errors
        raise UserError(f"{path} is not a readable pickle ({type(e).__name__}: {e}).") from None
    bad = UserError(f"{path} is not a mini-ImageNet cache pickle: expected a dict with "
                    "image_data (uint8 array N x H x W x 3) and class_dict (wnid -> row indices).")
    if not isinstance(data, dict) or "image_data" not in data or "class_dict" not in data:
        raise bad
    images, class_dict = data["image_data"], data["class_dict"]
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[3] != 3 or not isinstance(class_dict, dict):
        raise bad
    out: dict[str, list[int]] = {}
    for wnid, rows in class_dict.items():
        if not isinstance(wnid, str) or not isinstance(rows, (list, tuple, np.ndarray)):
            raise bad
        try:
            idx = [int(r) for r in rows]
        except (TypeError, ValueError):
            raise bad from None
        if any(r < 0 or r >= images.shape[0] for r in idx):
            raise UserError(f"{path}: class_dict[{wnid!r}] has row indices outside image_data "
                            f"(which has {images.shape[0]} rows).")
        out[wnid] = idx
    return images, out


def import_miniimagenet(path: Path, root: Path | None = None, reporter: Reporter | None = None,
                        any_split: bool = False) -> FewShotDataset:
    """`mamlpp data import miniimagenet PATH`: detect the layout, verify, write the cache."""
    reporter = reporter or Reporter()
    path = Path(path).expanduser()
    if path.is_file() and path.suffix.lower() == ".pkl":
        path = path.parent
    source = open_source(path)
    try:
        plan = detect(source)
        label = source.label
        if plan.layout == "pickle":
            sizes, dicts = {}, {}
            for split in SPLITS:  # pass 1: class lists only
                images, class_dict = load_pickle(plan.pickles[split])
                del images
                dicts[split] = class_dict
            classes = {s: sorted(dicts[s]) for s in SPLITS}
            for split in SPLITS:
                if not dicts[split]:
                    raise UserError(f"{plan.pickles[split]} has no classes.")
                per = _check_per_class(split, {w: len(r) for w, r in dicts[split].items()}, label)
                sizes[split] = (len(classes[split]), per)
        else:
            classes = {s: [w for w, _ in plan.classes[s]] for s in SPLITS}
            sizes = {}
            for split in SPLITS:
                per = _check_per_class(split, {w: len(f) for w, f in plan.classes[split]}, label)
                sizes[split] = (len(plan.classes[split]), per)
        _check_classes({s: sizes[s][0] for s in SPLITS}, label, any_split)
        _check_disjoint(classes, label)
        per_class = {sizes[s][1] for s in SPLITS}
        if per_class != {STANDARD_PER_CLASS}:
            reporter.note(f"Note: {', '.join(f'{sizes[s][1]} {s}' for s in SPLITS)} images per "
                          f"class (the full mini-ImageNet has {STANDARD_PER_CLASS}); importing "
                          "them as they are.")
        total = sum(c * k for c, k in sizes.values())
        shape = (3, IMAGE_SIZE, IMAGE_SIZE)
        with CacheWriter("miniimagenet", sizes, shape, root) as writer:
            reporter.start("import mini-ImageNet", total, unit="images")
            if plan.layout == "pickle":
                for split in SPLITS:
                    images, class_dict = load_pickle(plan.pickles[split])
                    for ci, wnid in enumerate(classes[split]):
                        writer.write(split, ci, 0, _resize_hwc(images[class_dict[wnid]]))
                        reporter.advance(sizes[split][1])
                    del images
            else:
                slots = {}
                for split in SPLITS:
                    for ci, (_, files) in enumerate(plan.classes[split]):
                        for ii, name in enumerate(files):
                            slots[name] = (split, ci, ii)
                for name, data in source.iter_read(list(slots)):
                    split, ci, ii = slots[name]
                    writer.write(split, ci, ii, decode_rgb(data, f"{name} in {label}"))
                    reporter.advance(1)
            reporter.done()
            writer.commit({
                "pixel_max": 255,
                "normalize": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD},
                "train_augment": None,
                "source": {"kind": "import", "layout": plan.layout,
                           "path": str(path.resolve())},
                "class_names": classes,
                "details": {"pixels": "uint8 RGB 0..255, [3, 84, 84]",
                            "resize": "PIL LANCZOS to 84x84 when another size",
                            "order": "classes sorted by wnid; images by file name "
                                     "(class_dict order for pickles)"},
            })
    finally:
        source.close()
    dataset = load_cached("miniimagenet", root)
    assert dataset is not None
    return dataset
