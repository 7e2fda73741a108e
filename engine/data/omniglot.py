"""Omniglot: download or take local zips/folders, verify by content, convert to a 28x28 cache.

Conversion (documented in the manifest too):
- every PNG (105x105, 1-bit, black ink on white) is inverted so that ink = 1 and box-filtered
  down to 28x28 (PIL BOX: each output pixel is the mean of the 3x3 to 4x4 source pixels whose
  centres lie in its 3.75x3.75 area, rounded to 8 bits); an output pixel is ink (1) when that
  mean is at least 128/255, else 0: uint8 values in {0, 1};
- the class split is the split of the reference implementation (the MAML++ authors' code),
  so test numbers compare with the paper's: the 1623 characters of both zips, named
  `<alphabet>/<character>` (the zip's top folder is not part of the name), sorted, shuffled with
  numpy's RandomState(985773), cut 1150 train / 50 val / 423 test (`engine/data/splits.py` has
  the exact rule); each split lists its classes sorted by name; the 20 drawings of a class are
  sorted by file name. The manifest records it as `class_split.method = "reference"`; a cache
  made with mamlpp's previous split (sha256 order of the paths) is rebuilt on next use.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from engine.data.cache import CacheWriter, FewShotDataset, load_cached, resolve_root
from engine.data.download import download_file
from engine.data.images import decode_image
from engine.data.progress import Reporter
from engine.data.sources import FolderSource, Source, ZipSource, open_source
from engine.data.splits import (
    OMNIGLOT_REFERENCE,
    OMNIGLOT_REFERENCE_DESCRIPTION,
    OMNIGLOT_REFERENCE_FRACTIONS,
    OMNIGLOT_REFERENCE_SEED,
    reference_sizes,
    reference_split,
)
from engine.errors import UserError

OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
URL_ENV = "MAMLPP_OMNIGLOT_URL"
# md5 of the canonical zips at OMNIGLOT_URL.
OMNIGLOT_MD5 = {
    "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
}
SUBSETS = {"images_background": 964, "images_evaluation": 659}
PER_CLASS = 20
IMAGE_SIZE = 28
OMNIGLOT_SPLIT = reference_sizes(1623)  # (1150, 50, 423)

_PNG = re.compile(r"(?:^|/)(images_background|images_evaluation)/([^/]+)/([^/]+)/([^/]+\.png)$",
                  re.IGNORECASE)


def split_classes(names: Sequence[str],
                  sizes: Sequence[int] = OMNIGLOT_SPLIT) -> dict[str, list[str]]:
    """`<alphabet>/<character>` names per split (train, val, test): the reference split."""
    return reference_split(names, sizes)


def _sources_for(paths: Sequence[Path]) -> list[Source]:
    """Sources to look in, preferring extracted folders over zips found beside them."""
    sources: list[Source] = []
    for path in paths:
        path = Path(path).expanduser()
        if path.is_dir():
            sources.append(FolderSource(path))
            zips = sorted(path.glob("*.zip")) + sorted(path.glob("*/*.zip"))
            sources.extend(ZipSource(z) for z in zips
                           if z.name.lower().startswith(tuple(SUBSETS)))
        else:
            sources.append(open_source(path))
    return sources


def find_classes(sources: Sequence[Source]) -> dict[str, list[tuple[Source, str]]]:
    """Class path -> its PNGs (source, name), sorted; each subset taken from one source."""
    owner: dict[str, Source] = {}
    found: dict[str, dict[str, list[tuple[Source, str]]]] = {}
    for source in sources:
        mine: dict[str, dict[str, list[tuple[Source, str]]]] = {}
        for name in source.names():
            m = _PNG.search(name)
            if not m:
                continue
            subset = m.group(1).lower()
            key = f"{subset}/{m.group(2)}/{m.group(3)}"
            mine.setdefault(subset, {}).setdefault(key, []).append((source, name))
        for subset, classes in mine.items():
            if subset not in owner:
                owner[subset] = source
                found[subset] = classes
    out: dict[str, list[tuple[Source, str]]] = {}
    for classes in found.values():
        for key, files in classes.items():
            out[key] = sorted(files, key=lambda f: f[1])
    return out


def _check_content(classes: dict[str, list[tuple[Source, str]]], labels: str,
                   full: bool) -> None:
    counts = {s: sum(1 for k in classes if k.startswith(s + "/")) for s in SUBSETS}
    for subset, expected in SUBSETS.items():
        if counts[subset] == 0:
            raise UserError(f"No {subset} characters found in {labels}; Omniglot needs both "
                            "images_background and images_evaluation (the two zips or their "
                            "extracted folders).")
        if full and counts[subset] != expected:
            raise UserError(f"Found {counts[subset]} characters in {subset} in {labels}, "
                            f"expected {expected}; the Omniglot files are incomplete.")
    for key, files in classes.items():
        if len(files) != PER_CLASS:
            raise UserError(f"Omniglot character {key} has {len(files)} drawings in {labels}, "
                            f"expected {PER_CLASS}; the files are incomplete.")


def convert_png(data: bytes, where: str) -> np.ndarray:
    """One Omniglot PNG -> uint8 [28, 28] in {0, 1}, ink = 1 (see the module docstring)."""
    grey = decode_image(data, where, "L")
    ink = Image.fromarray(255 - np.asarray(grey, dtype=np.uint8))
    small = np.asarray(ink.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX))
    return (small >= 128).astype(np.uint8)


def convert_omniglot(paths: Sequence[Path], root: Path | None = None,
                     reporter: Reporter | None = None,
                     split_sizes: Sequence[int] = OMNIGLOT_SPLIT,
                     source_info: dict | None = None) -> FewShotDataset:
    """Verify Omniglot by content in `paths` (zips and/or folders) and write its cache.

    `split_sizes` other than (1150, 50, 423) is for tests on a subset of alphabets: the content
    check then only requires both halves and 20 drawings per character.
    """
    reporter = reporter or Reporter()
    full = tuple(split_sizes) == OMNIGLOT_SPLIT
    sources = _sources_for(paths)
    try:
        labels = " and ".join(s.label for s in sources) or " and ".join(map(str, paths))
        classes = find_classes(sources)
        if not classes:
            raise UserError(f"No Omniglot images found in {labels}; expected images_background.zip"
                            " and images_evaluation.zip or their extracted folders "
                            "(images_background/<alphabet>/<character>/*.png).")
        _check_content(classes, labels, full)
        if len(classes) != sum(split_sizes):
            raise UserError(f"Found {len(classes)} Omniglot characters, the split needs "
                            f"{sum(split_sizes)}.")
        by_name: dict[str, str] = {}  # <alphabet>/<character> -> its key with the zip's folder
        for key in classes:
            name = key.split("/", 1)[1]
            if name in by_name:
                raise UserError(f"Omniglot character {name} is in both {by_name[name]} and "
                                f"{key} in {labels}; the files are mixed up.")
            by_name[name] = key
        split = split_classes(list(by_name), split_sizes)
        shape = (1, IMAGE_SIZE, IMAGE_SIZE)
        sizes = {s: (len(names), PER_CLASS) for s, names in split.items()}
        total = len(classes) * PER_CLASS
        with CacheWriter("omniglot", sizes, shape, root) as writer:
            reporter.start("convert omniglot", total, unit="images")
            for s, names in split.items():
                for ci, key in enumerate(names):
                    block = np.empty((PER_CLASS, *shape), np.uint8)
                    for ii, (source, name) in enumerate(classes[by_name[key]]):
                        block[ii, 0] = convert_png(source.read(name), f"{name} in {source.label}")
                    writer.write(s, ci, 0, block)
                    reporter.advance(PER_CLASS)
            reporter.done()
            info = dict(source_info or {})
            info.setdefault("kind", "local")
            info.setdefault("paths", [str(Path(p).expanduser().resolve()) for p in paths])
            writer.commit({
                "pixel_max": 1,
                "normalize": None,
                "train_augment": "rot90",
                "source": info,
                "class_names": split,
                "class_split": {
                    "method": OMNIGLOT_REFERENCE,
                    "description": OMNIGLOT_REFERENCE_DESCRIPTION,
                    "seed": OMNIGLOT_REFERENCE_SEED,
                    "fractions": list(OMNIGLOT_REFERENCE_FRACTIONS),
                },
                "details": {
                    "pixels": "uint8 {0,1}, ink = 1",
                    "resize": "105x105 -> 28x28: invert, PIL BOX filter, ink where >= 128/255",
                    "split": "<alphabet>/<character> names sorted, indices shuffled with numpy "
                             "RandomState(985773), cut at the reference fractions",
                    "split_sizes": list(split_sizes),
                },
            })
    finally:
        for source in sources:
            source.close()
    dataset = load_cached("omniglot", root)
    assert dataset is not None
    return dataset


def fetch_omniglot(root: Path | None = None, from_paths: Sequence[Path] | None = None,
                   base_url: str | None = None, checksums: dict[str, str | None] | None = None,
                   reporter: Reporter | None = None, retries: int = 5,
                   backoff: float = 1.0, timeout: float = 60.0) -> FewShotDataset:
    """`mamlpp data fetch omniglot`: local files (`from_paths`) or a verified download.

    The download base URL is `base_url`, else $MAMLPP_OMNIGLOT_URL, else the canonical
    location; `checksums` maps zip name -> md5 (default: the canonical md5s; None skips).
    Downloads go to <data root>/downloads/omniglot/ and are kept, so a new fetch resumes.
    """
    reporter = reporter or Reporter()
    if from_paths:
        return convert_omniglot(list(from_paths), root, reporter)
    base = (base_url or os.environ.get(URL_ENV) or OMNIGLOT_URL).rstrip("/")
    sums = dict(OMNIGLOT_MD5 if checksums is None else checksums)
    folder = resolve_root(root) / "downloads" / "omniglot"
    files = []
    for name in OMNIGLOT_MD5:
        files.append(download_file(f"{base}/{name}", folder / name, sums.get(name), reporter,
                                   retries=retries, timeout=timeout, backoff=backoff))
    info = {"kind": "download", "urls": [f"{base}/{n}" for n in OMNIGLOT_MD5],
            "md5": {n: sums.get(n) for n in OMNIGLOT_MD5}}
    return convert_omniglot(files, root, reporter, source_info=info)
