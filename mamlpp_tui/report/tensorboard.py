"""`mamlpp export RUN --tensorboard DIR`: a run's events as TensorBoard scalars.

Written with the writer PyTorch ships for it (`torch.utils.tensorboard.SummaryWriter`, which
needs the `tensorboard` package: `pip install mamlpp[tensorboard]`). Every tidy scalar of the
run (`scalars.run_scalars`) becomes one point: tag `type/metric[/layer][/step_N][/epoch_E]`,
step the event's iteration, wall time the event's time. The resolved config goes in as text,
a Markdown table of `key = value` lines. The run lands in `DIR/<run id>/`, so several runs
exported into one DIR show side by side in `tensorboard --logdir DIR`.

Exporting again replaces the run's folder rather than appending a second copy of every point.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from engine.errors import UserError
from mamlpp_tui.report.rundata import RunData
from mamlpp_tui.report.scalars import config_rows, run_scalars

MISSING = "TensorBoard export needs the tensorboard package: pip install 'mamlpp[tensorboard]'."


def _summary_writer():
    try:
        import tensorboard  # noqa: F401  (torch's writer imports it lazily and fails obscurely)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(MISSING) from None
    return SummaryWriter


def config_markdown(config: dict) -> str:
    lines = ["| key | value |", "| --- | --- |"]
    lines += [f"| {key} | `{value}` |" for key, value in config_rows(config)]
    return "\n".join(lines)


def export_tensorboard(data: RunData, out: Path) -> Path:
    """Write the run's scalars and config under `out/<run id>/`; return that folder."""
    SummaryWriter = _summary_writer()
    target = Path(out) / data.run_id
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    writer = SummaryWriter(log_dir=str(target), flush_secs=3600)
    try:
        writer.add_text("config", config_markdown(data.config), global_step=0)
        for s in run_scalars(data.events):
            writer.add_scalar(s.tag, s.value, global_step=s.iteration, walltime=s.time)
    finally:
        writer.close()
    return target
