"""Few-shot tasks from a cached dataset, deterministic per (run seed, split, task index).

Task t of a split is drawn with a torch.Generator seeded by `task_seed(seed, split, t)` (the
first 8 bytes of sha256("mamlpp-task/<seed>/<split>/<t>"), little-endian, top bit cleared), so
it is the same task whatever was sampled before, in any process: a resumed run needs no RNG
state, and validation/test tasks are fixed (and differ, since the split is in the seed).

From that generator, in this order:
1. `classes = randperm(n_classes)[:ways]`: class i of the task gets label i, so labels
   0..ways-1 go to the drawn classes in a random order;
2. `picks = rand(ways, per_class).argsort(1)[:, :shots + queries]`: per class, distinct images;
   the first `shots` are the support set, the rest the query set (disjoint);
3. `rot = randint(0, 4, (ways,))`: with augmentation (Omniglot and quickstart training), class
   i's images are rotated by rot[i] * 90 degrees (torch.rot90); drawn always, so augmentation
   does not change which images a task has.
Support and query are laid out class-major: y_support = [0]*shots + [1]*shots + ...

Datasets whose classes have different numbers of images (folder imports) keep a split as one
[images, C, H, W] tensor with per-class counts; classes with fewer than shots + queries images
are left out of that split's tasks (`excluded`), and step 2 becomes, per drawn class c in
order, `rand(count[c]).argsort()[:shots + queries]`.

Images become float32 only here: uint8 / pixel_max, and for mini-ImageNet (x - mean) / std
(computed as one multiply-add, x * 1/(255 std) - mean/std).
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from engine.data.cache import FewShotDataset
from engine.errors import UserError
from engine.task_threads import start_worker_thread
from engine.tasks import TaskBatch

if TYPE_CHECKING:
    from engine.config import Config


def task_seed(seed: int, split: str, index: int) -> int:
    digest = hashlib.sha256(f"mamlpp-task/{seed}/{split}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class TaskSampler:
    """Tasks of one split: `batch(start, count)` gives tasks start..start+count-1 as float32.

    `augment` (default: the dataset's training augmentation, rot90 for Omniglot and quickstart,
    on the train split only) turns the per-class rotations on or off. `device` keeps the split's
    uint8 images there (e.g. on the GPU), so batches are assembled where they are used.
    """

    def __init__(self, dataset: FewShotDataset, split: str, ways: int, shots: int, queries: int,
                 seed: int, augment: bool | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.dataset = dataset
        self.split = split
        self.ways, self.shots, self.queries = int(ways), int(shots), int(queries)
        self.seed = int(seed)
        self.device = torch.device(device)
        images = dataset.images(split)
        counts = dataset.class_counts.get(split)
        self.excluded: list[str] = []  # classes too small for a task (varying counts only)
        self._counts = self._offsets = None
        if counts is None:
            n_classes, per_class = int(images.shape[0]), int(images.shape[1])
            self.image_shape = tuple(int(v) for v in images.shape[2:])
            flat = images.reshape(n_classes * per_class, *self.image_shape)
        else:
            n_classes, per_class, flat = self._keep_large_enough(dataset, split, counts, images)
        if self.ways > n_classes:
            raise UserError(f"data.ways = {ways} needs at least {ways} classes, but the {split} "
                            f"split of {dataset.name} has {n_classes}"
                            + (f" with {self.shots + self.queries} images or more (data.shots + "
                               "data.queries)." if counts is not None else "."))
        if self.shots + self.queries > per_class:
            raise UserError(f"data.shots + data.queries = {shots} + {queries} needs "
                            f"{shots + queries} images per class, but the {split} split of "
                            f"{dataset.name} has {per_class} per class.")
        self.n_classes, self.per_class = n_classes, per_class
        self.flat = flat.to(self.device)
        if augment is None:
            augment = split == "train" and dataset.train_augment == "rot90"
        self.augment = bool(augment)
        self.pixel_max = dataset.pixel_max
        self._affine = pixel_affine(self.pixel_max, dataset.normalize, self.image_shape[0],
                                    self.device)
        k = self.shots
        self._y_support = torch.arange(self.ways).repeat_interleave(k)
        self._y_query = torch.arange(self.ways).repeat_interleave(self.queries)

    def _keep_large_enough(self, dataset: FewShotDataset, split: str, counts: list[int],
                           images: torch.Tensor) -> tuple[int, int, torch.Tensor]:
        """Varying images per class: the classes with at least shots + queries images."""
        need = self.shots + self.queries
        names = dataset.class_names.get(split) or [str(i) for i in range(len(counts))]
        keep = [i for i, n in enumerate(counts) if n >= need]
        self.excluded = [names[i] for i, n in enumerate(counts) if n < need]
        offsets = [0]
        for n in counts[:-1]:
            offsets.append(offsets[-1] + n)
        self._counts = [counts[i] for i in keep]
        self._offsets = torch.tensor([offsets[i] for i in keep], dtype=torch.int64)
        self.image_shape = tuple(int(v) for v in images.shape[1:])
        return len(keep), min(self._counts, default=0), images

    # -- index generation ---------------------------------------------------------------------
    def task_indices(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(classes [ways], image picks [ways, shots+queries], quarter turns [ways]) of task t."""
        if index < 0:
            raise ValueError(f"task index must be >= 0 (got {index})")
        g = torch.Generator().manual_seed(task_seed(self.seed, self.split, index))
        classes = torch.randperm(self.n_classes, generator=g)[: self.ways]
        if self._counts is None:
            picks = torch.rand(self.ways, self.per_class, generator=g).argsort(dim=1)
            picks = picks[:, : self.shots + self.queries]
        else:
            picks = torch.stack([torch.rand(self._counts[c], generator=g).argsort()
                                 [: self.shots + self.queries] for c in classes.tolist()])
        turns = torch.randint(0, 4, (self.ways,), generator=g)
        return classes, picks, turns

    def flat_index(self, classes: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
        """Rows of the split's images for (classes, picks) of `task_indices`."""
        if self._offsets is None:
            return classes[:, None] * self.per_class + picks
        return self._offsets[classes][:, None] + picks

    # -- assembly -----------------------------------------------------------------------------
    def raw_batch(self, start: int, count: int) -> TaskBatch:
        """Tasks start..start+count-1 with uint8 images (on the sampler's device)."""
        idx, turns = [], []
        for t in range(start, start + count):
            classes, picks, rot = self.task_indices(t)
            idx.append(self.flat_index(classes, picks))
            turns.append(rot)
        flat_idx = torch.stack(idx).to(self.device)  # [B, ways, s+q]
        x = self.flat[flat_idx]  # [B, ways, s+q, C, H, W]
        if self.augment:
            quarter = torch.stack(turns).to(self.device)  # [B, ways]
            for k in (1, 2, 3):
                mask = quarter == k
                if bool(mask.any()):
                    x[mask] = torch.rot90(x[mask], k, dims=(-2, -1))
        b, s = count, self.shots
        shape = self.image_shape
        xs = x[:, :, :s].reshape(b, self.ways * s, *shape)
        xq = x[:, :, s:].reshape(b, self.ways * self.queries, *shape)
        ys = self._y_support.expand(b, -1).to(self.device)
        yq = self._y_query.expand(b, -1).to(self.device)
        return TaskBatch(xs, ys.contiguous(), xq, yq.contiguous())

    def to_float(self, batch: TaskBatch) -> TaskBatch:
        """uint8 -> float32 in [0,1] (then mean/std normalised where the dataset says so)."""
        def convert(x: torch.Tensor) -> torch.Tensor:
            return pixels_to_float(x, self.pixel_max, self._affine)

        return TaskBatch(convert(batch.x_support), batch.y_support, convert(batch.x_query),
                         batch.y_query)

    def batch(self, start: int, count: int) -> TaskBatch:
        """Tasks with global indices start..start+count-1, float32, on the sampler's device."""
        return self.to_float(self.raw_batch(start, count))

    def task(self, index: int) -> TaskBatch:
        return self.batch(index, 1)


def pixel_affine(pixel_max: int, normalize, channels: int,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, bias) [C, 1, 1] that make (x / pixel_max - mean) / std one multiply-add, or None
    without normalisation. `engine.preprocess` uses it too, so predictions get their inputs
    exactly as training and evaluation did."""
    if normalize is None:
        return None
    mean = torch.tensor(normalize[0], dtype=torch.float64).view(channels, 1, 1)
    std = torch.tensor(normalize[1], dtype=torch.float64).view(channels, 1, 1)
    return ((1.0 / (pixel_max * std)).float().to(device), (-mean / std).float().to(device))


def pixels_to_float(x: torch.Tensor, pixel_max: int,
                    affine: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """uint8 pixels -> float32: x / pixel_max, then the per-channel affine when given."""
    y = x.to(torch.float32)
    if affine is not None:
        scale, bias = (v.to(y.device) for v in affine)
        return torch.addcmul(bias, y, scale)
    if pixel_max != 1:
        y = y / pixel_max
    return y


def sampler_for(config: Config, split: str, dataset: FewShotDataset | None = None,
                device: torch.device | str = "cpu", augment: bool | None = None) -> TaskSampler:
    """The sampler a run uses for `split` (train/val/test), seeded by train.seed."""
    from engine.data.datasets import load_dataset

    if dataset is None:
        dataset = load_dataset(config.data.dataset)
    expected = tuple(config.image_shape)
    if dataset.image_shape != expected:
        raise UserError(f"The cached {dataset.name} images are {dataset.image_shape}, the config "
                        f"expects {expected}; re-create the cache.")
    d = config.data
    return TaskSampler(dataset, split, d.ways, d.shots, d.queries, config.train.seed,
                       augment=augment, device=device)


_END = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetcher:
    """Assemble the next meta-batches in a background thread while the current one trains.

    Iterating yields `n_batches` TaskBatches: batch i holds tasks
    first_index + i*stride ... + meta_batch - 1 (stride defaults to meta_batch), float32 on
    `device`. At most `depth` batches wait ready. `wait_seconds` is the total time the consumer
    spent waiting for data
    (`wait_count` the number of waits). An error in the thread is raised in the consumer.
    Use as a context manager, or call `close()`, when stopping early.
    """

    def __init__(self, sampler: TaskSampler, first_index: int, meta_batch: int, n_batches: int,
                 device: torch.device | str = "cpu", depth: int = 2,
                 stride: int | None = None) -> None:
        self.sampler = sampler
        self.first_index = int(first_index)
        self.meta_batch = int(meta_batch)
        # distance between consecutive batches' first tasks: the global meta-batch when this
        # process holds only its share of each meta-batch
        self.stride = int(stride or meta_batch)
        self.n_batches = int(n_batches)
        self.device = torch.device(device)
        self.wait_seconds = 0.0
        self.wait_count = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._finished = False
        self._thread = start_worker_thread(self._work, "mamlpp-prefetch")

    def __len__(self) -> int:
        return self.n_batches

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            cuda = self.device.type == "cuda"
            stream = torch.cuda.Stream(self.device) if cuda else None
            for i in range(self.n_batches):
                if self._stop.is_set():
                    return
                start = self.first_index + i * self.stride
                if stream is not None:
                    with torch.cuda.stream(stream):
                        raw = self.sampler.raw_batch(start, self.meta_batch)
                        if raw.x_support.device.type == "cpu":
                            raw = TaskBatch(*(t.pin_memory() for t in (
                                raw.x_support, raw.y_support, raw.x_query, raw.y_query)))
                        batch = self.sampler.to_float(raw.to(self.device))
                    stream.synchronize()
                else:
                    raw = self.sampler.raw_batch(start, self.meta_batch)
                    batch = self.sampler.to_float(raw.to(self.device))
                if not self._put(batch):
                    return
            self._put(_END)
        except BaseException as e:  # hand any failure to the consumer
            self._put(_Failure(e))

    def __iter__(self) -> Iterator[TaskBatch]:
        return self

    def __next__(self) -> TaskBatch:
        if self._finished:
            raise StopIteration
        t0 = time.perf_counter()
        item = self._queue.get()
        self.wait_seconds += time.perf_counter() - t0
        self.wait_count += 1
        if item is _END:
            self._finished = True
            self._thread.join()
            raise StopIteration
        if isinstance(item, _Failure):
            self._finished = True
            raise item.error
        if self.device.type == "cuda":
            current = torch.cuda.current_stream(self.device)
            for t in (item.x_support, item.y_support, item.x_query, item.y_query):
                t.record_stream(current)
        return item

    def close(self) -> None:
        """Stop the thread (the batches not yet taken are dropped)."""
        self._stop.set()
        self._finished = True
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
