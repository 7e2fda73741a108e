"""Reports people look at: `mamlpp report`, `mamlpp compare` and the TensorBoard/CSV exports.

One module per job:

- `rundata`: one run's directory folded into a `RunData` (the dashboard reader's `RunView`
  plus the full de-duplicated event stream and what the engine's schedules say);
- `scalars`: the tidy (event, metric) rows both exporters write;
- `figures`: matplotlib figures of one run, of runs overlaid, of a study;
- `html`: the self-contained `index.html` around them;
- `build`: writes a report folder for a run, a comparison or a study;
- `compare`: config differences and results of several runs (rich tables and HTML rows);
- `tensorboard`, `tidy_csv`: the two exports.

Nothing here is imported by the engine, and matplotlib/tensorboard are imported only by the
modules that draw or write them, so the rest of the CLI starts as fast as before.
"""
