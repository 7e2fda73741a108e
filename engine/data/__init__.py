"""Data: dataset caches, importers, the quickstart glyph set and the task sampler.

    load_dataset(name)                 cached dataset (quickstart is generated on first use)
    require_dataset(name)              cheap check: UserError with the fetch/import command
    TaskSampler(dataset, split, ...)   deterministic tasks: batch(start, count) -> TaskBatch
    sampler_for(config, split)         the sampler a run uses
    Prefetcher(sampler, ...)           next meta-batches assembled in a background thread
    fetch_omniglot / import_miniimagenet / dataset_info   what `mamlpp data ...` calls
"""

from __future__ import annotations

import importlib

# Imported on first use (PEP 562): `mamlpp --help`, `runs`, `show` and the other commands that
# touch no data must not pay torch's import through this package (engine.data.progress is
# imported by the CLI at start-up, which imports this package first).
_WHERE = {
    "FewShotDataset": "cache", "load_cached": "cache",
    "dataset_info": "datasets", "load_dataset": "datasets", "require_dataset": "datasets",
    "import_miniimagenet": "miniimagenet",
    "convert_omniglot": "omniglot", "fetch_omniglot": "omniglot",
    "LineReporter": "progress", "Reporter": "progress",
    "build_quickstart": "quickstart",
    "Prefetcher": "sampler", "TaskSampler": "sampler", "sampler_for": "sampler",
    "task_seed": "sampler",
}


def __getattr__(name: str):
    if name == "TaskBatch":  # re-exported from engine.tasks
        return importlib.import_module("engine.tasks").TaskBatch
    if name in _WHERE:
        return getattr(importlib.import_module(f"engine.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'engine.data' has no attribute {name!r}")


__all__ = [
    "FewShotDataset",
    "LineReporter",
    "Prefetcher",
    "Reporter",
    "TaskBatch",
    "TaskSampler",
    "build_quickstart",
    "convert_omniglot",
    "dataset_info",
    "fetch_omniglot",
    "import_miniimagenet",
    "load_cached",
    "load_dataset",
    "require_dataset",
    "sampler_for",
    "task_seed",
]
