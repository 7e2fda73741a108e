"""The ensemble's members have one definition (engine.selection.top_k_epochs), and checkpoint
retention and the dashboard use it: a tie goes to the earlier epoch everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.checkpoints import epoch_name, list_checkpoints, prune, save_checkpoint
from engine.config import EvalConfig
from engine.events import EventWriter
from engine.run_store import create_run
from engine.selection import top_k_epochs
from mamlpp_tui.dashboard import RunWatcher


def h(*pairs):
    return [{"epoch": e, "accuracy": a} for e, a in pairs]


def test_top_k_epochs_best_first_ties_to_the_earlier_epoch():
    history = h((0, 0.5), (1, 0.7), (2, 0.6), (3, 0.7), (4, 0.5))
    assert top_k_epochs(history, 3) == [1, 3, 2]
    assert top_k_epochs(history, 4) == [1, 3, 2, 0]
    assert top_k_epochs(history[::-1], 4) == [1, 3, 2, 0]  # input order does not matter
    assert top_k_epochs(history, 10) == [1, 3, 2, 0, 4]
    assert top_k_epochs(history, 0) == []
    # no finite accuracy: never a member (NaN would otherwise sort anywhere)
    odd = h((0, None), (1, float("nan")), (2, True), (3, "0.9"), (4, 0.1), (5, float("inf")))
    assert top_k_epochs(odd, 3) == [4]


def test_prune_keeps_the_members_the_ensemble_picks_on_ties(tmp_path: Path):
    """Four epochs with one accuracy, top-3: the ensemble takes epochs 0, 1, 2, so retention
    must keep them (it used to keep the newer ones on ties and deleted epoch 0)."""
    for epoch in range(4):
        save_checkpoint(tmp_path, epoch_name(epoch), {"w": torch.zeros(1)},
                        {"iteration": 10 * (epoch + 1), "epoch": epoch, "val_accuracy": 0.5})
    assert prune(tmp_path, keep_top_k=3) == []
    members = top_k_epochs(h(*((e, 0.5) for e in range(4))), 3)
    assert members == [0, 1, 2]
    save_checkpoint(tmp_path, epoch_name(4), {"w": torch.zeros(1)},
                    {"iteration": 50, "epoch": 4, "val_accuracy": 0.4})
    assert prune(tmp_path, keep_top_k=3) == [epoch_name(3)]  # newest (4) and the members kept
    assert sorted(list_checkpoints(tmp_path)) == [epoch_name(e) for e in (0, 1, 2, 4)]


@pytest.mark.parametrize("config, top_k, top", [
    ({"eval": {"ensemble_top_k": 2}}, 2, (1, 0)),
    ({}, EvalConfig.ensemble_top_k, (1, 0, 2)),  # the engine's default
    ({"eval": {"ensemble_top_k": 0}}, EvalConfig.ensemble_top_k, (1, 0, 2)),  # invalid config
])
def test_dashboard_marks_the_engines_top_k(tmp_path, monkeypatch, config, top_k, top):
    monkeypatch.setenv("MAMLPP_HOME", str(tmp_path))
    run = create_run({"name": "tiny", **config})
    with EventWriter(run.events_path) as ev:
        for epoch, acc in enumerate([0.6, 0.8, 0.6, 0.5]):
            ev.write("val", iteration=10 * epoch, epoch=epoch, accuracy=acc, ci95=0.0, loss=1.0,
                     tasks=5)
    view = RunWatcher(run.path, local_sampling=False).poll()
    assert view.top_k == top_k
    assert view.top_epochs == top
    history = [{"epoch": e, **v} for e, v in view.val.items()]
    assert list(view.top_epochs) == top_k_epochs(history, top_k)


@pytest.mark.parametrize("maml_pp, epoch, second", [
    ({"second_order": True, "first_order_epochs": 3}, 2, False),
    ({"second_order": True, "first_order_epochs": 3}, 3, True),
    ({"second_order": False, "first_order_epochs": 0}, 5, False),
])
def test_dashboard_phase_before_any_train_event_is_the_engines_schedule(
        tmp_path, monkeypatch, maml_pp, epoch, second):
    from engine.config import from_dict
    from engine.schedule import second_order_at

    monkeypatch.setenv("MAMLPP_HOME", str(tmp_path))
    config = {"name": "tiny", "train": {"epochs": 10}, "maml_pp": maml_pp}
    run = create_run(config)
    run.write_status(state="running", iteration=0, epoch=epoch)
    view = RunWatcher(run.path, local_sampling=False).poll()
    assert view.second_order is second_order_at(epoch, from_dict(config)) is second
