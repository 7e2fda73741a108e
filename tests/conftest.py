"""Test-session settings.

Under pytest-xdist each worker gets one intra-op thread (and so do the engine processes the
tests start), so two workers on two cores do not oversubscribe them: with the default of one
thread per core each, OpenMP spin-waiting made the suite several times slower.
"""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
