"""Wall time of a preset's whole schedule, estimated from measured phases
(`mamlpp bench --whole-run PRESET`): the figure a user plans a run with.

A meta-iteration costs what its epoch's phase costs: first or second order (derivative-order
annealing, `engine.schedule.second_order_at`) and whether every step's query loss counts (MSL,
`engine.msl.msl_weights`) or the last step's alone. Each phase the schedule holds is timed on
synthetic tasks, as `mamlpp bench` times a step, and

    training   = sum over epochs of iters_per_epoch x s/iteration of the epoch's phase
    validation = epochs x val_tasks x s/task
    ensemble   = ensemble_top_k x test_tasks x s/task

The same estimate is made for the reference code's schedule (SPEC 2.2: its configs train second
order from the first epoch) with the same measured phases, so the two differ by the schedule
alone. Checkpoint writes and start-up are left out (seconds in a run of hours).
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from engine.config import Config, resolve
from engine.schedule import second_order_at

Phase = tuple[bool, bool]  # (second order, every step's query loss counts)


def phase_name(phase: Phase) -> str:
    return f"{'second' if phase[0] else 'first'} order, " + (
        "every step's loss" if phase[1] else "last step's loss")


def epoch_phase(epoch: int, cfg: Config) -> Phase:
    p = cfg.maml_pp
    return second_order_at(epoch, cfg), p.msl and epoch < p.msl_epochs


def schedule(cfg: Config) -> Counter[Phase]:
    """Epochs per phase."""
    return Counter(epoch_phase(e, cfg) for e in range(cfg.train.epochs))


def reference_schedule(cfg: Config) -> Config:
    """The config with the reference code's derivative order: second order throughout."""
    out = copy.deepcopy(cfg)
    out.maml_pp.first_order_epochs = 0
    return out


def estimate(cfg: Config, s_per_iter: dict[Phase, float], s_per_task: float) -> dict[str, Any]:
    """Seconds of training, validation and the ensemble for cfg's schedule."""
    t, e = cfg.train, cfg.eval
    epochs = schedule(cfg)
    training = sum(n * t.iters_per_epoch * s_per_iter[phase] for phase, n in epochs.items())
    validation = t.epochs * e.val_tasks * s_per_task
    ensemble = e.ensemble_top_k * e.test_tasks * s_per_task
    total = training + validation + ensemble
    return {"epochs_per_phase": {phase_name(k): v for k, v in sorted(epochs.items())},
            "training_s": training, "validation_s": validation, "ensemble_s": ensemble,
            "total_s": total, "total_hours": total / 3600}


def measure_whole_run(preset: str, overrides: list[str], device: str, iters: int | None,
                      eval_tasks: int,
                      progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Time every phase the preset's schedule and the reference schedule hold (the default
    path, in this process), then estimate both."""
    import torch

    from engine.bench import (
        _eval_tasks,
        _train_phase,
        default_iters,
        device_info,
        synthetic_dataset,
    )

    cfg = resolve(preset, overrides=overrides)
    reference = reference_schedule(cfg)
    phases = sorted(set(schedule(cfg)) | set(schedule(reference)))
    dev = torch.device(device)
    dataset = synthetic_dataset(cfg)
    iters = iters or default_iters(cfg)
    measured: dict[Phase, dict[str, Any]] = {}
    for phase in phases:
        progress(f"{preset}: timing {phase_name(phase)} ({iters} iterations)")
        epoch = 0 if phase[1] else cfg.maml_pp.msl_epochs
        job = {"warmup": 1, "iters": iters, "impl": "auto", "count_flops": False,
               "epoch": epoch}
        measured[phase] = _train_phase(job, cfg, dataset, dev, "second" if phase[0] else "first",
                                       None)
    progress(f"{preset}: timing validation ({eval_tasks} tasks)")
    val = _eval_tasks({"impl": "auto"}, cfg, dataset, dev, eval_tasks)
    s_iter = {k: v["s_per_iter"] for k, v in measured.items()}
    return {
        "preset": preset, "overrides": overrides, "device": device_info(device),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "iters": iters,
        "phases": [{"phase": phase_name(k), "second_order": k[0], "every_step_loss": k[1],
                    "s_per_iter": v["s_per_iter"], "seconds": v["seconds"],
                    "path": v["path"]} for k, v in measured.items()],
        "validation": {"tasks": val["tasks"], "s_per_task": val["s_per_task"]},
        "schedule": estimate(cfg, s_iter, val["s_per_task"]),
        "reference_schedule": estimate(reference, s_iter, val["s_per_task"]),
    }
