"""Config: presets load, overrides apply, and every bad value is one sentence naming its key."""

from __future__ import annotations

import pytest

from engine.config import ConfigError, resolve
from engine.presets import preset_names

PAPER = {
    "omniglot-5w1s": (5, 1, 1, 8, 64, 0.1, 10),
    "omniglot-5w5s": (5, 5, 1, 8, 64, 0.1, 10),
    "omniglot-20w1s": (20, 1, 1, 8, 64, 0.1, 10),
    "omniglot-20w5s": (20, 5, 1, 8, 64, 0.1, 10),
    "miniimagenet-5w1s": (5, 1, 15, 2, 48, 0.01, 15),
    "miniimagenet-5w5s": (5, 5, 15, 2, 48, 0.01, 15),
}


def test_ships_the_paper_presets_and_quickstart():
    assert set(preset_names()) == set(PAPER) | {"quickstart"}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_presets_match_spec_table(name):
    c = resolve(name)
    ways, shots, q, mb, filters, inner_lr, msl_epochs = PAPER[name]
    assert (c.data.ways, c.data.shots, c.data.queries) == (ways, shots, q)
    assert (c.train.meta_batch, c.model.filters, c.train.inner_lr) == (mb, filters, inner_lr)
    assert c.maml_pp.msl_epochs == msl_epochs
    assert (c.train.epochs, c.train.iters_per_epoch, c.train.meta_lr) == (100, 500, 1e-3)
    assert (c.train.inner_steps, c.train.eval_inner_steps, c.train.min_meta_lr) == (5, 5, 1e-5)
    assert c.maml_pp.first_order_epochs == 50 and c.maml_pp.second_order
    assert (c.eval.val_tasks, c.eval.test_tasks, c.eval.ensemble_top_k) == (600, 600, 3)
    assert c.train.grad_clip == (10.0 if name.startswith("mini") else 0.0)
    p = c.maml_pp
    assert all([p.msl, p.bn_per_step_stats, p.bn_per_step_affine, p.lslr, p.cosine])


def test_overrides_parse_toml_values_and_bare_strings():
    c = resolve("omniglot-5w1s", overrides=["train.meta_lr=3e-4", "maml_pp.msl=false",
                                            "train.impl=vmap", 'data.dataset="quickstart"',
                                            "name=mine", "train.meta_lr=1"])
    assert c.train.meta_lr == 1.0 and isinstance(c.train.meta_lr, float)
    assert c.maml_pp.msl is False and c.train.impl == "vmap" and c.name == "mine"
    assert c.data.dataset == "quickstart"


def test_config_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('name = "x"\n[data]\ndataset = "quickstart"\nways = 3\n')
    c = resolve(config_file=f)
    assert c.data.ways == 3 and c.train.epochs == 100
    f.write_text("[data\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve(config_file=f)


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.ways=1", "data.ways"),
        ("data.shots=0", "data.shots"),
        ("data.queries=0", "data.queries"),
        ("train.epochs=0", "train.epochs"),
        ("train.iters_per_epoch=0", "train.iters_per_epoch"),
        ("train.eval_inner_steps=0", "train.eval_inner_steps"),
        ("train.inner_steps=0", "train.inner_steps"),
        ("train.meta_batch=0", "train.meta_batch"),
        ("train.meta_lr=0", "train.meta_lr"),
        ("train.min_meta_lr=1", "train.min_meta_lr"),
        ("train.inner_lr=-1", "train.inner_lr"),
        ("train.impl=fast", "train.impl"),
        ("train.chunk_size=-1", "train.chunk_size"),
        ("model.stages=5", "model.stages"),
        ("model.filters=0", "model.filters"),
        ("maml_pp.bn_eval_stats=mean", "maml_pp.bn_eval_stats"),
        ("maml_pp.msl_epochs=0", "maml_pp.msl_epochs"),
        ("maml_pp.first_order_epochs=-2", "maml_pp.first_order_epochs"),
        ("eval.val_tasks=0", "eval.val_tasks"),
        ("eval.ensemble_top_k=0", "eval.ensemble_top_k"),
        ("data.dataset=no/such", "data.dataset"),
        ("data.ways=five", "data.ways"),
        ("data.ways=2.5", "data.ways"),
        ("maml_pp.msl=1", "maml_pp.msl"),
        ("train.meta_lr=fast", "train.meta_lr"),
        ("train.bogus=1", "train.bogus"),
        ("nosection.key=1", "nosection.key"),
    ],
)
def test_bad_values_are_one_sentence_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        resolve("omniglot-5w1s", overrides=[override])
    message = str(err.value)
    assert key in message
    assert "\n" not in message and message.endswith(".")


def test_msl_epochs_zero_is_fine_when_msl_is_off():
    assert resolve("quickstart", overrides=["maml_pp.msl=false", "maml_pp.msl_epochs=0"])


def test_unknown_preset():
    with pytest.raises(ConfigError, match="Unknown preset 'nope'"):
        resolve("nope")
