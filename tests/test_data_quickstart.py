"""quickstart: generated deterministically and quickly, cached on first use, glyph-like, and
learnable (classes separable from one example far above chance)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from engine.data import TaskSampler, load_dataset
from engine.data import quickstart as qs


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("qs") / "data"
    return load_dataset("quickstart", root)  # nothing cached yet: generated on first use


@pytest.mark.slow  # a wall-clock bound: on a loaded machine it measures the load
def test_generated_and_cached_in_under_ten_seconds(tmp_path):
    t0 = time.perf_counter()
    load_dataset("quickstart", tmp_path / "data")
    seconds = time.perf_counter() - t0
    print(f"\nquickstart generated and cached in {seconds:.2f} s")
    assert seconds < 10.0


def test_generated_on_first_use_with_the_documented_shape(generated):
    assert generated.counts() == {
        "train": {"classes": 2000, "per_class": 20, "images": 40000},
        "val": {"classes": 400, "per_class": 20, "images": 8000},
        "test": {"classes": 600, "per_class": 20, "images": 12000}}
    assert generated.image_shape == (1, 28, 28)
    assert generated.pixel_max == 1 and generated.train_augment == "rot90"
    for x in generated.splits.values():
        assert set(torch.unique(x).tolist()) == {0, 1}
        per_image = x.float().mean(dim=(2, 3, 4))
        assert per_image.min() > 0.01  # every sample has strokes
        assert 0.06 < per_image.mean() < 0.2


def test_generation_is_deterministic_and_matches_the_cache(generated):
    a = qs.generate(n_classes=200)
    b = qs.generate(n_classes=200)
    assert torch.equal(a, b)
    assert torch.equal(a, generated.splits["train"][:200])  # blocks do not depend on the total
    assert not torch.equal(qs.generate(seed=1, n_classes=200), a)


def test_second_load_uses_the_cache_and_a_new_version_regenerates(generated):
    root = generated.path.parent
    tensor_file = generated.path / "images.safetensors"
    stamp = tensor_file.stat().st_mtime_ns
    again = load_dataset("quickstart", root)
    assert tensor_file.stat().st_mtime_ns == stamp
    assert again.manifest["content_sha256"] == generated.manifest["content_sha256"]
    manifest_path = generated.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["source"]["version"] = -1  # made by another generator version
    manifest_path.write_text(json.dumps(manifest))
    fresh = load_dataset("quickstart", root)
    assert fresh.manifest["source"]["version"] == qs.GENERATOR_VERSION
    assert fresh.manifest["content_sha256"] == generated.manifest["content_sha256"]


def test_samples_of_a_class_are_jittered_not_copied(generated):
    x = generated.splits["val"][:100].flatten(2).float()  # [classes, 20, 784]
    within = (x[:, :1] - x[:, 1:]).abs().sum(-1)  # distance to the first sample of the class
    assert (within > 0).all()  # no sample is an exact copy
    between = (x[:, :1] - x.roll(1, dims=0)[:, 1:]).abs().sum(-1)
    assert within.mean() < 0.9 * between.mean()  # but a class stays closer to itself


def test_one_shot_nearest_neighbour_is_far_above_chance(generated):
    """Learnability: 5-way 1-shot by nearest neighbour on raw pixels, on unrotated test tasks."""
    s = TaskSampler(generated, "test", 5, 1, 1, seed=0)
    b = s.batch(0, 300)
    d = torch.cdist(b.x_query.flatten(2), b.x_support.flatten(2))  # [300, 5, 5]
    predicted = b.y_support.gather(1, d.argmin(-1))
    accuracy = (predicted == b.y_query).float().mean().item()
    print(f"pixel nearest-neighbour 5-way 1-shot accuracy {accuracy:.3f}")
    assert accuracy > 0.4  # chance is 0.2
