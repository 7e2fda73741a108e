"""Load a dataset by name (with the exact command to get it when missing), and list the cache."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from engine.data.cache import (
    DATASET_NAMES,
    GET_COMMANDS,
    FewShotDataset,
    list_cached,
    load_cached,
    read_manifest,
    resolve_root,
)
from engine.data.progress import Reporter
from engine.errors import UserError

_MISSING = {
    "omniglot": "Omniglot is not in the data cache ({root}); download it with "
                "`mamlpp data fetch omniglot`, or use `mamlpp data fetch omniglot --from PATH` "
                "with the two zips or their extracted folders.",
    "miniimagenet": "mini-ImageNet is not in the data cache ({root}); import your copy with "
                    "`mamlpp data import miniimagenet PATH`.",
}


def require_dataset(name: str, root: Path | None = None, reporter: Reporter | None = None,
                    refresh: bool = True) -> None:
    """Cheap check before a run starts: a UserError with the fix when `name` is not cached.

    quickstart always passes (it is generated on first use). Reads the manifest only, except
    that with `refresh` an Omniglot cache made with mamlpp's previous class split is rebuilt
    with the reference implementation's (a one-line note through `reporter` first).
    """
    _check_known(name, root)
    if name != "quickstart" and read_manifest(name, root) is None:
        raise UserError(_MISSING[name].format(root=resolve_root(root)))
    if refresh and name == "omniglot":
        from engine.data.splits import refresh_omniglot

        refresh_omniglot(root, reporter)


def load_dataset(name: str, root: Path | None = None, reporter: Reporter | None = None,
                 verify: bool = False) -> FewShotDataset:
    """The cached dataset `name` (omniglot | miniimagenet | quickstart) from the data root.

    quickstart is generated and cached on first use; a missing Omniglot or mini-ImageNet is a
    UserError whose one sentence gives the command that fetches or imports it. An Omniglot
    cache made with mamlpp's previous class split is rebuilt with the reference split.
    """
    _check_known(name, root)
    if name == "quickstart":
        from engine.data.quickstart import build_quickstart, quickstart_is_current

        if not quickstart_is_current(root):
            build_quickstart(root, reporter)
    if name == "omniglot":  # a cache with mamlpp's previous class split is rebuilt first
        from engine.data.splits import refresh_omniglot

        refresh_omniglot(root, reporter)
    for attempt in range(3):  # another process may be swapping the folder in right now
        dataset = load_cached(name, root, verify=verify)
        if dataset is not None:
            return dataset
        if name != "quickstart":
            break
        time.sleep(0.1 * (attempt + 1))
    if name == "quickstart":
        raise UserError(f"The quickstart data could not be cached in {resolve_root(root)}.")
    _check_known(name, root)
    raise UserError(_MISSING[name].format(root=resolve_root(root)))


def _check_known(name: str, root: Path | None) -> None:
    """Built-in names pass; any other must be a dataset imported into the cache."""
    if name in DATASET_NAMES:
        return
    from engine.config import IMPORTED_NAME

    if not IMPORTED_NAME.match(name or "") or read_manifest(name, root) is None:
        raise UserError(f"Unknown dataset {name!r}: it is not built in ({', '.join(DATASET_NAMES)}"
                        f") and not in the data cache ({resolve_root(root)}); import your own "
                        f"images with `mamlpp data import folder PATH --name {name}`.")


def dataset_info(root: Path | None = None) -> dict[str, Any]:
    """What `mamlpp data info --json` prints: each cached dataset with its counts per split
    and its class split (`split`: method, description, digest)."""
    from engine.data.splits import class_names_of, describe_split, split_digest

    base = resolve_root(root)
    datasets: list[dict[str, Any]] = []
    for m in list_cached(base):
        if "error" in m:
            datasets.append({"name": m["name"], "path": m["path"], "error": m["error"]})
            continue
        splits = {s: {k: v[k] for k in ("classes", "per_class", "per_class_max", "images")
                      if k in v}
                  for s, v in m["splits"].items()}
        datasets.append({
            "name": m["name"],
            "path": m["path"],
            "image_shape": m["image_shape"],
            "splits": splits,
            "split": {**describe_split(m), "digest": split_digest(class_names_of(m))},
            "classes": sum(v["classes"] for v in splits.values()),
            "images": sum(v["images"] for v in splits.values()),
            "bytes": m["file_size"],
            "source": m.get("source"),
            "created": m.get("created"),
            "content_sha256": m.get("content_sha256"),
        })
    have = {d["name"] for d in datasets}
    missing = [{"name": n, "command": GET_COMMANDS[n]} for n in DATASET_NAMES if n not in have]
    return {"root": str(base), "datasets": datasets, "missing": missing}


def dataset_classes(name: str, root: Path | None = None) -> dict[str, Any]:
    """What `mamlpp data info NAME --classes --json` prints: the class names of each split."""
    from engine.data.splits import class_names_of, describe_split, split_digest

    manifest = read_manifest(name, root) if name and "/" not in name else None
    if manifest is None:
        have = ", ".join(m["name"] for m in list_cached(root) if "error" not in m) or "none"
        raise UserError(f"No cached dataset named {name!r} in {resolve_root(root)} (cached: "
                        f"{have}); see `mamlpp data info`.")
    names = class_names_of(manifest)
    return {"name": name, "split": {**describe_split(manifest), "digest": split_digest(names)},
            "splits": names}
