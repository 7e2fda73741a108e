"""The live dashboard (`mamlpp watch RUN`, and what `mamlpp run`/`resume` open on a terminal).

It reads only the run directory and writes only `control.json`, so it opens on any run, live or
not, started here or on another terminal. `run_dashboard(run_dir)` is the entry point; the
`DashboardApp` class is exposed for embedding and for headless tests (`App.run_test()`).
"""

from mamlpp_tui.dashboard.app import ConfirmScreen, DashboardApp, run_dashboard
from mamlpp_tui.dashboard.reader import Decimator, RunView, RunWatcher

__all__ = ["ConfirmScreen", "DashboardApp", "Decimator", "RunView", "RunWatcher", "run_dashboard"]
