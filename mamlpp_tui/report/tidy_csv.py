"""`mamlpp export RUN --csv DIR`: a run's events as tidy CSV files for pandas and friends.

`DIR/<run id>/scalars.csv`: one row per event and metric (`scalars.COLUMNS`: run, type,
iteration, epoch, time, metric, layer, step, member, value; the qualifiers a metric does not
have are empty), the same numbers the TensorBoard export writes. `pd.read_csv(path)` and then
e.g. `df[df.metric == "step_loss"].pivot(index="iteration", columns="step", values="value")`.

`DIR/<run id>/config.csv`: key, value (as JSON) for every key of config.json, runtime included.

Floats are written with `repr`, so they read back bit for bit.
"""

from __future__ import annotations

import csv
from pathlib import Path

from mamlpp_tui.report.rundata import RunData
from mamlpp_tui.report.scalars import COLUMNS, config_rows, run_scalars


def _cell(value) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


def export_csv(data: RunData, out: Path) -> Path:
    """Write `scalars.csv` and `config.csv` under `out/<run id>/`; return that folder."""
    target = Path(out) / data.run_id
    target.mkdir(parents=True, exist_ok=True)
    with open(target / "scalars.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for s in run_scalars(data.events):
            writer.writerow([data.run_id, *(_cell(v) for v in s)])
    with open(target / "config.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("key", "value"))
        writer.writerows(config_rows(data.config))
    return target
