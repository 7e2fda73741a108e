"""Task sampler and prefetcher: shapes, labels, disjoint support/query, determinism per task
index, rotations on training only, normalisation, and the background prefetcher."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from engine.config import resolve
from engine.data import Prefetcher, TaskSampler, sampler_for, task_seed
from engine.errors import UserError
from engine.tasks import TaskBatch
from tests.data_fixtures import synthetic_dataset

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def identify(dataset, split: str, image: torch.Tensor) -> tuple[int, int, int]:
    """Independently find (class, index, quarter turns) of a sampled uint8 image."""
    x = dataset.splits[split]
    for k in range(4):
        rotated = torch.rot90(x, k, dims=(-2, -1))
        hits = (rotated == image).flatten(2).all(-1).nonzero()
        if len(hits):
            assert len(hits) == 1
            return int(hits[0, 0]), int(hits[0, 1]), k
    raise AssertionError("sampled image is not in the dataset")


def test_shapes_types_and_balanced_labels():
    ds = synthetic_dataset()
    for ways, shots, queries in [(5, 1, 1), (5, 5, 3), (20, 1, 2), (3, 2, 6)]:
        s = TaskSampler(ds, "train", ways, shots, queries, seed=1)
        b = s.batch(0, 4)
        assert isinstance(b, TaskBatch) and b.size == 4
        assert b.x_support.shape == (4, ways * shots, 1, 12, 12)
        assert b.x_query.shape == (4, ways * queries, 1, 12, 12)
        assert b.x_support.dtype == torch.float32 and b.y_support.dtype == torch.int64
        for y, per in ((b.y_support, shots), (b.y_query, queries)):
            for row in y:
                assert torch.equal(torch.bincount(row, minlength=ways), torch.full((ways,), per))


@pytest.mark.parametrize("split", ["train", "val"])
def test_support_and_query_are_disjoint_draws_from_distinct_classes(split):
    ds = synthetic_dataset()
    ways, shots, queries = 5, 3, 4
    s = TaskSampler(ds, split, ways, shots, queries, seed=7)
    raw = s.raw_batch(10, 6)
    labels_to_class_sets = []
    for t in range(6):
        owner: dict[int, int] = {}
        turns: dict[int, set[int]] = {}
        seen: dict[int, set[int]] = {}
        for xs, ys in ((raw.x_support[t], raw.y_support[t]), (raw.x_query[t], raw.y_query[t])):
            for img, label in zip(xs, ys.tolist(), strict=True):
                c, i, k = identify(ds, split, img)
                assert owner.setdefault(label, c) == c  # one class per label
                turns.setdefault(label, set()).add(k)
                assert i not in seen.setdefault(c, set())  # no image twice in a task
                seen[c].add(i)
        assert len(set(owner.values())) == ways  # distinct classes
        assert all(len(v) == 1 for v in turns.values())  # one rotation per class and task
        if split == "val":
            assert all(v == {0} for v in turns.values())  # no rotation at evaluation
        labels_to_class_sets.append(tuple(owner[i] for i in range(ways)))
        classes, picks, _ = s.task_indices(10 + t)
        assert [owner[i] for i in range(ways)] == classes.tolist()
        for i in range(ways):
            assert seen[int(classes[i])] == set(picks[i].tolist())
    assert len(set(labels_to_class_sets)) == 6


def test_training_rotations_are_per_class_quarter_turns():
    ds = synthetic_dataset()
    s = TaskSampler(ds, "train", 5, 1, 1, seed=3)
    assert s.augment
    seen = set()
    raw = s.raw_batch(0, 20)
    for t in range(20):
        _, _, turns = s.task_indices(t)
        for j in range(5):
            c, i, k = identify(ds, "train", raw.x_support[t, j])
            assert k == int(turns[j])
            assert torch.equal(raw.x_support[t, j], torch.rot90(ds.splits["train"][c, i], k,
                                                                dims=(-2, -1)))
            seen.add(k)
    assert seen == {0, 1, 2, 3}
    off = TaskSampler(ds, "train", 5, 1, 1, seed=3, augment=False)
    assert not off.augment
    for j in range(5):
        assert identify(ds, "train", off.raw_batch(0, 1).x_support[0, j])[2] == 0
    # augmentation changes only the rotation, never which images a task has
    assert [identify(ds, "train", x)[:2] for x in off.raw_batch(4, 1).x_support[0]] == \
        [identify(ds, "train", x)[:2] for x in s.raw_batch(4, 1).x_support[0]]
    # datasets without training augmentation (mini-ImageNet) are never rotated
    plain = synthetic_dataset(train_augment=None)
    assert not TaskSampler(plain, "train", 5, 1, 1, seed=3).augment


def test_task_t_is_the_same_in_any_sampler_and_when_skipped_to():
    ds = synthetic_dataset()
    a = TaskSampler(ds, "train", 5, 2, 3, seed=11)
    b = TaskSampler(ds, "train", 5, 2, 3, seed=11)
    run = a.batch(0, 12)
    a.batch(100, 7)  # whatever happened before does not matter
    direct = b.batch(9, 1)
    for name in ("x_support", "y_support", "x_query", "y_query"):
        assert torch.equal(getattr(run, name)[9:10], getattr(direct, name))
    again = a.batch(3, 4)
    assert torch.equal(again.x_query, run.x_query[3:7])
    # other seed, other split: other tasks
    assert not torch.equal(TaskSampler(ds, "train", 5, 2, 3, seed=12).batch(9, 1).x_support,
                           direct.x_support)
    assert task_seed(0, "val", 5) != task_seed(0, "test", 5)
    assert task_seed(0, "train", 5) == task_seed(0, "train", 5)


def test_the_label_order_is_random():
    ds = synthetic_dataset(classes=(6, 6, 6))
    s = TaskSampler(ds, "train", 5, 1, 1, seed=0)
    firsts = {int(s.task_indices(t)[0][0]) for t in range(40)}
    assert len(firsts) >= 5


def test_pixels_are_scaled_and_normalised():
    glyphs = synthetic_dataset()
    b = TaskSampler(glyphs, "val", 5, 1, 1, seed=0).batch(0, 2)
    assert set(torch.unique(b.x_support).tolist()) <= {0.0, 1.0}
    rgb = synthetic_dataset(shape=(3, 10, 10), pixel_max=255,
                            normalize={"mean": MEAN, "std": STD}, train_augment=None)
    s = TaskSampler(rgb, "train", 4, 2, 1, seed=0)
    raw = s.raw_batch(5, 2)
    out = s.batch(5, 2)
    mean = torch.tensor(MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float64).view(3, 1, 1)
    expected = (raw.x_query.double() / 255.0 - mean) / std
    assert out.x_query.dtype == torch.float32
    assert torch.allclose(out.x_query.double(), expected, atol=1e-5)


def test_impossible_task_shapes_are_user_errors():
    ds = synthetic_dataset(classes=(30, 10, 12), per_class=8)
    with pytest.raises(UserError, match="has 10"):
        TaskSampler(ds, "val", 20, 1, 1, seed=0)
    with pytest.raises(UserError, match="has 8 per class"):
        TaskSampler(ds, "train", 5, 5, 5, seed=0)
    with pytest.raises(UserError, match="no split"):
        TaskSampler(ds, "holdout", 5, 1, 1, seed=0)


def test_sampler_for_uses_the_config():
    ds = synthetic_dataset(shape=(1, 28, 28), classes=(40, 20, 20), per_class=10)
    cfg = resolve("quickstart", overrides=["data.ways=4", "data.shots=2", "data.queries=3",
                                          "train.seed=5"])
    s = sampler_for(cfg, "val", ds)
    assert (s.ways, s.shots, s.queries, s.seed, s.split) == (4, 2, 3, 5, "val")
    direct = TaskSampler(ds, "val", 4, 2, 3, seed=5)
    assert torch.equal(s.batch(2, 3).x_support, direct.batch(2, 3).x_support)
    wrong = synthetic_dataset(shape=(3, 84, 84), classes=(6, 6, 6), per_class=6)
    with pytest.raises(UserError, match="expects"):
        sampler_for(cfg, "train", wrong)


def test_prefetcher_yields_the_sampler_batches_in_order():
    ds = synthetic_dataset()
    s = TaskSampler(ds, "train", 5, 1, 2, seed=2)
    with Prefetcher(s, first_index=40, meta_batch=4, n_batches=6, device="cpu") as p:
        got = list(p)
    assert len(got) == 6 and len(p) == 6
    for i, b in enumerate(got):
        ref = s.batch(40 + 4 * i, 4)
        assert torch.equal(b.x_support, ref.x_support) and torch.equal(b.y_query, ref.y_query)


class _SlowSampler:
    """Wraps a sampler; each raw batch takes `delay` seconds (or fails at `fail_at`)."""

    def __init__(self, inner: TaskSampler, delay: float, fail_at: int | None = None) -> None:
        self.inner, self.delay, self.fail_at = inner, delay, fail_at

    def raw_batch(self, start: int, count: int) -> TaskBatch:
        if self.fail_at is not None and start >= self.fail_at:
            raise RuntimeError("boom in the data thread")
        time.sleep(self.delay)
        return self.inner.raw_batch(start, count)

    def to_float(self, batch: TaskBatch) -> TaskBatch:
        return self.inner.to_float(batch)


class _FakeClock:
    """`time` for engine.data.sampler: the clock moves only when a test says so. Every
    consumer-side reading that starts a wait (the odd ones) opens `gate` once, so a gated
    producer starts a batch only after the consumer has begun waiting for it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.reads = 0
        self.gate = threading.Semaphore(0)

    def perf_counter(self) -> float:
        self.reads += 1
        if self.reads % 2:
            self.gate.release()
        return self.now


class _ClockedSampler:
    """Each batch costs `cost` fake seconds; with `gated`, it starts only when asked for."""

    def __init__(self, inner: TaskSampler, clock: _FakeClock, cost: float, gated: bool) -> None:
        self.inner, self.clock, self.cost, self.gated = inner, clock, cost, gated

    def raw_batch(self, start: int, count: int) -> TaskBatch:
        if self.gated:
            assert self.clock.gate.acquire(timeout=60)
        self.clock.now += self.cost
        return self.inner.raw_batch(start, count)

    def to_float(self, batch: TaskBatch) -> TaskBatch:
        return self.inner.to_float(batch)


def test_prefetcher_counts_only_time_spent_blocked_on_data(monkeypatch):
    """wait_seconds sums the time between asking for a batch and getting it, on a fake clock:
    a producer that starts each batch only when asked makes every wait its cost (1 s), and
    the consumer's own work between batches (5 s each) is not counted; batches assembled
    before they are asked for cost no wait at all."""
    import engine.data.sampler as sampler_module

    clock = _FakeClock()
    monkeypatch.setattr(sampler_module, "time", clock)
    s = TaskSampler(synthetic_dataset(), "train", 5, 1, 1, seed=0)
    slow = Prefetcher(_ClockedSampler(s, clock, 1.0, gated=True), 0, 2, 6)
    for _ in slow:
        clock.now += 5.0  # the consumer's own work
    assert (slow.wait_count, slow.wait_seconds) == (7, 6.0)  # 6 batches, then the end
    ready = Prefetcher(_ClockedSampler(s, clock, 1.0, gated=False), 0, 2, 2, depth=2)
    assert _wait_until(lambda: ready._queue.full())  # both assembled ahead (2 fake s)
    assert len(list(ready)) == 2
    assert (ready.wait_count, ready.wait_seconds) == (3, 0.0)


def _wait_until(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.slow  # wall-clock bounds: on a loaded machine they measure the load
def test_prefetcher_measures_time_waited_for_data():
    s = TaskSampler(synthetic_dataset(), "train", 5, 1, 1, seed=0)
    slow = Prefetcher(_SlowSampler(s, 0.05), 0, 2, 6)
    for _ in slow:
        pass  # the consumer is fast: it waits for every batch
    assert slow.wait_seconds > 0.2 and slow.wait_count == 7
    fast = Prefetcher(_SlowSampler(s, 0.0), 0, 2, 6)
    time.sleep(0.1)
    for _ in fast:
        time.sleep(0.03)  # the consumer is slow: batches are ready when asked for
    assert fast.wait_seconds < 0.05


def test_prefetcher_raises_thread_errors_and_stops_early():
    s = TaskSampler(synthetic_dataset(), "train", 5, 1, 1, seed=0)
    p = Prefetcher(_SlowSampler(s, 0.0, fail_at=4), 0, 2, 10)
    assert next(p).size == 2 and next(p).size == 2
    with pytest.raises(RuntimeError, match="boom"):
        next(p)
    threads = threading.active_count()
    with Prefetcher(s, 0, 2, 1000, depth=2) as q:
        next(q)
    assert not q._thread.is_alive()
    assert threading.active_count() <= threads
    with pytest.raises(StopIteration):
        next(q)
