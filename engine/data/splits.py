"""Class splits: which classes are train, val and test, how a cache says so, and how a run
records the split it trained on.

Omniglot uses the split of the reference implementation (Antoniou et al.'s MAML++ code,
`data.py`), so a mamlpp test number is measured on the same 423 test characters as the paper's:

- all 1623 characters of both zips (images_background and images_evaluation together), each
  named `<alphabet>/<character>` (the zip's top folder is not part of the name), sorted with
  Python's `sorted` on those strings, get the indices 0..1622 in that order;
- the indices `numpy.arange(1623, dtype=numpy.int32)` are shuffled in place by
  `numpy.random.RandomState(985773).shuffle`; the seed is what the reference code derives from
  its config's `val_seed` 0: `numpy.random.RandomState(0).randint(1, 999999)`;
- the first `int(0.70918052988 * 1623)` = 1150 shuffled classes are train, up to
  `int((0.70918052988 + 0.03080714725) * 1623)` = 1200 validation, the remaining 423 test
  (the reference code's `train_val_test_split` fractions); each split lists its classes sorted.

mini-ImageNet keeps the split its files define; `describe_split` says whether that is the
standard Ravi & Larochelle split (the 16 validation and 20 test wnids below).

A cache's manifest holds `"class_split": {"method": ..., "description": ...}`. An importer of a
new kind of dataset may write its own; without one, `describe_split` says "as imported". A run
records `split_record(...)` under `runtime.data_split` in its config.json; `check_run_split`
refuses to resume (or ensemble) a run on a cache whose split differs from the recorded one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.errors import UserError

SPLITS = ("train", "val", "test")

# -- Omniglot: the reference implementation's split -----------------------------------------------
OMNIGLOT_REFERENCE_VAL_SEED = 0  # the reference config's val_seed
OMNIGLOT_REFERENCE_SEED = 985773  # numpy.random.RandomState(0).randint(1, 999999)
OMNIGLOT_REFERENCE_FRACTIONS = (0.70918052988, 0.03080714725)  # train, val; test is the rest
OMNIGLOT_REFERENCE = "reference"
OMNIGLOT_REFERENCE_DESCRIPTION = (
    "the split of the reference implementation (MAML++ code): the 1623 alphabet/character "
    "names sorted, shuffled with numpy RandomState(985773), cut 1150/50/423")
OMNIGLOT_PREVIOUS_DESCRIPTION = (
    "mamlpp's previous split (sha256 order of the zip paths), not the reference "
    "implementation's; it is rebuilt on next use")

# -- mini-ImageNet: Ravi & Larochelle's split -----------------------------------------------------
RAVI_VAL = (
    "n01855672 n02091244 n02114548 n02138441 n02174001 n02950826 n02971356 n02981792 "
    "n03075370 n03417042 n03535780 n03584254 n03770439 n03773504 n03980874 n09256479").split()
RAVI_TEST = (
    "n01930112 n01981276 n02099601 n02110063 n02110341 n02116738 n02129165 n02219486 "
    "n02443484 n02871525 n03127925 n03146219 n03272010 n03544143 n03775546 n04146614 "
    "n04149813 n04418357 n04522168 n07613480").split()
RAVI = "ravi"
RAVI_DESCRIPTION = "the standard Ravi & Larochelle split: 64 train, 16 val, 20 test classes"


def reference_sizes(n: int) -> tuple[int, int, int]:
    """(train, val, test) class counts of the reference code's cut of `n` classes."""
    train_frac, val_frac = OMNIGLOT_REFERENCE_FRACTIONS
    train_end, val_end = int(train_frac * n), int((train_frac + val_frac) * n)
    return train_end, val_end - train_end, n - val_end


def reference_order(names: Sequence[str], seed: int = OMNIGLOT_REFERENCE_SEED) -> list[str]:
    """`names` sorted, then permuted as the reference code shuffles class indices."""
    ordered = sorted(names)
    index = np.arange(len(ordered), dtype=np.int32)
    np.random.RandomState(seed).shuffle(index)
    return [ordered[i] for i in index]


def reference_split(names: Sequence[str],
                    sizes: Sequence[int] | None = None) -> dict[str, list[str]]:
    """Omniglot class names per split (train, val, test), each split sorted by name.

    `names` are `<alphabet>/<character>`. `sizes` (tests on a subset only) cuts the same
    shuffle at other counts; by default the reference fractions, 1150/50/423 for 1623 classes.
    """
    if len(set(names)) != len(names):
        raise ValueError("class names are not unique")
    sizes = tuple(sizes) if sizes is not None else reference_sizes(len(names))
    if len(names) != sum(sizes):
        raise ValueError(f"{len(names)} classes cannot be split into {sizes}")
    order = reference_order(names)
    out, start = {}, 0
    for split, n in zip(SPLITS, sizes, strict=True):
        out[split] = sorted(order[start:start + n])
        start += n
    return out


# -- what a cache holds ---------------------------------------------------------------------------

def class_names_of(manifest: dict[str, Any]) -> dict[str, list[str]]:
    """Class names per split, as listed in a cache manifest."""
    return {s: list(v.get("class_names") or [str(i) for i in range(v["classes"])])
            for s, v in (manifest.get("splits") or {}).items()}


def split_digest(class_names: dict[str, list[str]]) -> str:
    """Short hash of the classes of every split, in their order (it fixes the class indices)."""
    data = json.dumps({s: list(class_names[s]) for s in sorted(class_names)}, sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def describe_split(manifest: dict[str, Any]) -> dict[str, str]:
    """{"method", "description"} of a cached dataset's class split, from its manifest."""
    name = manifest.get("name")
    recorded = manifest.get("class_split")
    if name == "omniglot":
        if isinstance(recorded, dict) and recorded.get("method") == OMNIGLOT_REFERENCE:
            return {"method": OMNIGLOT_REFERENCE, "description": OMNIGLOT_REFERENCE_DESCRIPTION}
        return {"method": "previous", "description": OMNIGLOT_PREVIOUS_DESCRIPTION}
    if isinstance(recorded, dict) and recorded.get("method"):
        return {"method": str(recorded["method"]),
                "description": str(recorded.get("description") or recorded["method"])}
    if name == "miniimagenet":
        names = class_names_of(manifest)
        if sorted(names.get("val", [])) == RAVI_VAL and sorted(names.get("test", [])) == RAVI_TEST \
                and len(names.get("train", [])) == 64:
            return {"method": RAVI, "description": RAVI_DESCRIPTION}
        return {"method": "imported", "description": "as imported: not the standard Ravi & "
                                                     "Larochelle split"}
    if name == "quickstart":
        return {"method": "generated", "description": "generated glyph classes, fixed seed"}
    return {"method": "imported", "description": "as imported"}


def omniglot_is_stale(manifest: dict[str, Any] | None) -> bool:
    """True for an Omniglot cache made before the reference split (it must be rebuilt)."""
    return manifest is not None and manifest.get("name") == "omniglot" \
        and describe_split(manifest)["method"] != OMNIGLOT_REFERENCE


def split_record(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a run records in config.json's runtime (`data_split`): the classes it used."""
    names = class_names_of(manifest)
    return {"dataset": manifest.get("name"), **describe_split(manifest),
            "classes": {s: len(v) for s, v in names.items()}, "digest": split_digest(names)}


def check_run_split(run_id: str, dataset: str, recorded: dict[str, Any] | None,
                    current: dict[str, Any], action: str = "resume") -> None:
    """UserError when a run that trained on one class split would go on with another.

    `recorded` is the run's `runtime.data_split` (None for a run made before splits were
    recorded: on Omniglot that run used the previous split, elsewhere the split never changed).
    """
    if recorded is None:
        if dataset != "omniglot" or current.get("method") != OMNIGLOT_REFERENCE:
            return
        raise UserError(
            f"Run {run_id} was trained on mamlpp's previous Omniglot class split (it predates "
            "the reference implementation's split now in the cache), so it cannot "
            f"{action} on other classes; start a new run with the same settings.")
    if recorded.get("digest") == current.get("digest"):
        return
    raise UserError(
        f"Run {run_id} was trained on {dataset}'s {recorded.get('method')} class split "
        f"(digest {recorded.get('digest')}), but the cached {dataset} now has the "
        f"{current.get('method')} split (digest {current.get('digest')}), so it cannot {action} "
        "on other classes; start a new run, or restore the cache it was trained with.")


def refresh_omniglot(root=None, reporter=None) -> bool:  # noqa: ANN001 - Path | None, Reporter
    """Rebuild an Omniglot cache made with the previous split; True when it was rebuilt.

    The files it was made from (the recorded local paths, or the zips kept under
    <data root>/downloads/omniglot/) are converted again, after a one-line note through
    `reporter`. Without them: a UserError naming the command that rebuilds it.
    """
    from pathlib import Path

    from engine.data.cache import read_manifest, resolve_root
    from engine.data.omniglot import OMNIGLOT_MD5, convert_omniglot
    from engine.data.progress import Reporter

    manifest = read_manifest("omniglot", root)
    if not omniglot_is_stale(manifest):
        return False
    reporter = reporter or Reporter()
    source = dict(manifest.get("source") or {})
    if source.get("kind") == "download":
        folder = resolve_root(root) / "downloads" / "omniglot"
        paths = [folder / name for name in OMNIGLOT_MD5]
    else:
        paths = [Path(p) for p in source.get("paths") or []]
    if not paths or not all(p.exists() for p in paths):
        raise UserError(
            "The cached omniglot has mamlpp's previous class split, not the reference "
            "implementation's, and the files it was made from are gone; rebuild it with "
            "`mamlpp data fetch omniglot --force` (or `mamlpp data fetch omniglot --from PATH` "
            "with the two zips).")
    sizes = (manifest.get("details") or {}).get("split_sizes")
    reporter.note(f"omniglot: the cache has mamlpp's previous class split; rebuilding it with "
                  f"the reference implementation's split from {', '.join(map(str, paths))}")
    kwargs = {} if not sizes or sum(sizes) == 1623 else {"split_sizes": tuple(sizes)}
    convert_omniglot(paths, root, reporter, source_info=source, **kwargs)
    return True


def check_run_data(run, reporter=None, action: str = "resume") -> None:  # noqa: ANN001
    """Before a run with checkpoints goes on (`mamlpp resume`): its dataset must be cached (an
    Omniglot cache with the previous split is rebuilt first) and hold the class split the run
    recorded, else a UserError in one sentence. `run` is an engine.run_store.RunDir."""
    from engine import checkpoints as ckpt
    from engine.data.cache import read_manifest
    from engine.data.datasets import require_dataset

    if not ckpt.list_checkpoints(run.checkpoints_dir):
        return  # nothing to continue: it starts over on the current cache
    raw = run.read_config()
    dataset = (raw.get("data") or {}).get("dataset")
    require_dataset(dataset, reporter=reporter)
    manifest = read_manifest(dataset)
    if manifest is None:  # quickstart, generated on first use
        return
    recorded = (raw.get("runtime") or {}).get("data_split")
    check_run_split(run.run_id, dataset, recorded, split_record(manifest), action)
