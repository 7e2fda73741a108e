"""Task threads never deadlock on the shared meta-parameters.

A meta-batch of 3 tasks in parts of 2 (folded: the first thing it does is `repeat` each leaf,
with the GIL released) and 1 (its first op is `first_conv`'s autograd.Function on the leaf
weight, GIL held) on two threads made torch wait for a leaf's mutex while holding the GIL in
one thread and for the GIL while holding that mutex in the other (engine/meta_batch.py
`_aliased`). Before the fix this script froze within 0-140 steps in each of 4 runs, so it runs
200; a frozen process holds the GIL, so it runs in a subprocess that the test can time out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 200

SCRIPT = r"""
import sys
from engine.learner import MetaLearner
from engine.msl import msl_weights
from tests.helpers import random_batch, small_config

learner = MetaLearner(small_config("train.impl=loop", "train.task_threads=2",
                                   "train.task_group=2", "train.meta_batch=3"))
assert learner.paths.task_threads == 2 and learner.paths.task_group == 2, learner.paths
cfg = learner.config
weights = msl_weights(1, cfg.train.inner_steps, cfg.maml_pp.msl_epochs, cfg.maml_pp.msl)
batch = random_batch(cfg, seed=3)
for i in range(int(sys.argv[1])):
    learner.meta_loss(batch, weights, i % 2 == 0)
print("steps done", i + 1)
"""


def test_two_task_threads_folded_and_alone_do_not_deadlock() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    try:
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(STEPS)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as e:  # run() has killed it
        raise AssertionError(f"{STEPS} meta-batches on two task threads did not finish in "
                             "180 s: deadlocked") from e
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == str(STEPS)
