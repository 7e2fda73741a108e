"""A full-size mini-ImageNet cache of random pixels (100 classes x 600 images, 84x84 RGB,
1.27 GB), written by the engine's own CacheWriter: what cache_load.py and run_rss.py measure
against, since the real data set is not on the benchmark machines."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

SPLITS = {"train": (64, 600), "val": (16, 600), "test": (20, 600)}
IMAGES = sum(classes * per_class for classes, per_class in SPLITS.values())


def write_miniimagenet(data_root: Path) -> float:
    """Write the cache under `data_root` (a MAMLPP_HOME's data folder); returns seconds taken."""
    from engine.data.cache import CacheWriter

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    with CacheWriter("miniimagenet", SPLITS, (3, 84, 84), data_root) as writer:
        for split, (classes, per_class) in SPLITS.items():
            for c in range(classes):
                writer.write(split, c, 0, rng.integers(0, 256, (per_class, 3, 84, 84),
                                                       dtype=np.uint8))
        writer.commit({"pixel_max": 255, "normalize": {"mean": [0.485, 0.456, 0.406],
                                                       "std": [0.229, 0.224, 0.225]},
                       "train_augment": None, "source": {"kind": "synthetic"}})
    return time.perf_counter() - t0
