"""Data: dataset caches, importers, the quickstart glyph set and the task sampler.

    load_dataset(name)                 cached dataset (quickstart is generated on first use)
    require_dataset(name)              cheap check: UserError with the fetch/import command
    TaskSampler(dataset, split, ...)   deterministic tasks: batch(start, count) -> TaskBatch
    sampler_for(config, split)         the sampler a run uses
    Prefetcher(sampler, ...)           next meta-batches assembled in a background thread
    fetch_omniglot / import_miniimagenet / dataset_info   what `mamlpp data ...` calls
"""

from engine.data.cache import FewShotDataset, load_cached
from engine.data.datasets import dataset_info, load_dataset, require_dataset
from engine.data.miniimagenet import import_miniimagenet
from engine.data.omniglot import convert_omniglot, fetch_omniglot
from engine.data.progress import LineReporter, Reporter
from engine.data.quickstart import build_quickstart
from engine.data.sampler import Prefetcher, TaskSampler, sampler_for, task_seed
from engine.tasks import TaskBatch

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
