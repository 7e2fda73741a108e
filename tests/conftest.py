"""Test-session settings.

Under pytest-xdist each worker gets one intra-op thread (and so do the engine processes the
tests start), so two workers on two cores do not oversubscribe them: with the default of one
thread per core each, OpenMP spin-waiting made the suite several times slower.

A hung test ends its process after HUNG_AFTER_S with every thread's stack in the run's summary.

The compiled CPU kernels (engine/fused_cpu.py) are built once, before any test, where a C
compiler exists, so that no test's time includes building them.
"""

import faulthandler
import os
import shutil
import tempfile
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

# No test runs this long (the slowest take about a minute): a test still running is hung.
HUNG_AFTER_S = 900
# where a hung test's stacks go: pytest captures fd 2 during a test, so into a file, which the
# controlling process prints at the end (xdist's workers inherit its environment)
_CONTROLLER = "MAMLPP_TEST_HUNG_DIR" not in os.environ
if _CONTROLLER:
    os.environ["MAMLPP_TEST_HUNG_DIR"] = tempfile.mkdtemp(prefix="mamlpp-hung-")
_HUNG_DIR = Path(os.environ["MAMLPP_TEST_HUNG_DIR"])


@pytest.fixture(autouse=True)
def _hung_test_watchdog(request: pytest.FixtureRequest):
    """Dump every thread's stack and end the process when a test hangs, so that the run fails
    with the place it hung instead of running out CI's clock. faulthandler's watchdog is a C
    thread: it fires even when a deadlock holds the GIL, where pytest's own timeouts cannot."""
    path = _HUNG_DIR / f"{os.getpid()}.txt"
    with path.open("w") as out:
        out.write(f"{request.node.nodeid} still running after {HUNG_AFTER_S} s:\n")
        out.flush()
        faulthandler.dump_traceback_later(HUNG_AFTER_S, exit=True, file=out)
        yield
        faulthandler.cancel_dump_traceback_later()
    path.unlink()


def pytest_configure(config) -> None:
    if _CONTROLLER:
        from engine import fused_cpu

        if fused_cpu.toolchain() is None:
            fused_cpu.load()


def pytest_terminal_summary(terminalreporter) -> None:
    if _CONTROLLER:
        for path in sorted(_HUNG_DIR.glob("*.txt")):
            terminalreporter.section("hung test")
            terminalreporter.write(path.read_text())


def pytest_unconfigure() -> None:
    if _CONTROLLER:
        shutil.rmtree(_HUNG_DIR, ignore_errors=True)
