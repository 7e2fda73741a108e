"""Variants of one step timed in turns in one process: this machine's speed drifts between
minutes by more than the differences measured, and alternating cancels it."""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def alternate(step: Callable[[str, object], None], names: list[str], sampler, meta_batch: int,
              rounds: int) -> dict[str, list[float]]:
    """Seconds of `step(name, batch)` per name and round: one untimed warm-up batch each, then
    every round's batch through every name, the order reversed every other round."""
    warm = sampler.batch(0, meta_batch)
    for name in names:
        step(name, warm)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        batch = sampler.batch((r + 1) * meta_batch, meta_batch)
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            step(name, batch)
            seconds[name].append(time.perf_counter() - t0)
    return seconds


def median_speedup(seconds: dict[str, list[float]], base: str, name: str) -> float:
    """The median over rounds of base's time over name's: > 1 when `name` is faster."""
    return statistics.median(a / b for a, b in zip(seconds[base], seconds[name]))


def child_json(argv: list[str], cwd: str | Path, env: dict[str, str] | None = None) -> dict:
    """What a fresh process measured: runs `argv --child-out FILE` in `cwd` and returns the JSON
    it wrote to FILE (its stdout is free for progress; a failure raises with its stderr)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "child.json"
        subprocess.run([*argv, "--child-out", str(out)], check=True, capture_output=True,
                       text=True, cwd=cwd, env=env)
        return json.loads(out.read_text())


def learners_for(preset: str, variants: dict[str, list[str]], split: str):
    """(the first variant's config, a CPU learner per variant made with its config overrides,
    a sampler of `split` tasks on the preset's synthetic data)."""
    from engine.bench import synthetic_dataset
    from engine.config import resolve
    from engine.data.sampler import sampler_for
    from engine.learner import MetaLearner

    configs = {k: resolve(preset, overrides=v) for k, v in variants.items()}
    cfg = next(iter(configs.values()))
    return (cfg, {k: MetaLearner(c, "cpu") for k, c in configs.items()},
            sampler_for(cfg, split, synthetic_dataset(cfg)))


def alternating_steps(preset: str, variants: dict[str, list[str]], rounds: int,
                      around: Callable[[str], object] | None = None, second_order: bool = True,
                      every_step: bool = True) -> dict:
    """Training steps of `preset` (second or first order; every step's loss counting, the MSL
    phase, or only the last's) alternating between learners made with each variant's config
    overrides, on the same meta-batches; `around(name)`, if given, is a context manager entered
    around each of that variant's steps. The report has each round's seconds and losses and the
    median ratio of the first variant's time over the second's."""
    from contextlib import nullcontext

    from engine.msl import msl_weights
    from engine.schedule import meta_lr

    names = list(variants)
    cfg, learners, sampler = learners_for(preset, variants, "train")
    t = cfg.train
    epoch = 0 if every_step else cfg.maml_pp.msl_epochs
    weights = msl_weights(epoch, t.inner_steps, cfg.maml_pp.msl_epochs, cfg.maml_pp.msl)
    losses: dict[str, list[float]] = {name: [] for name in learners}

    def step(name, batch):
        with around(name) if around else nullcontext():
            metrics = learners[name].update(batch, weights, second_order, meta_lr(0, cfg))
        losses[name].append(metrics.loss)

    seconds = alternate(step, names, sampler, t.meta_batch, rounds)
    ratio = median_speedup(seconds, names[0], names[1])
    order = "second" if second_order else "first"
    print(f"{preset} {order} order{'' if every_step else ', last step'}: "
          f"{names[0]} {statistics.median(seconds[names[0]]):.3f} s, "
          f"{names[1]} {statistics.median(seconds[names[1]]):.3f} s, {ratio:.3f}x", flush=True)
    return {"preset": preset, "order": order, "msl_phase": every_step,
            "paths": {k: v.paths.to_dict() for k, v in learners.items()}, "seconds": seconds,
            "losses": losses, "speedup_median_ratio": ratio}
