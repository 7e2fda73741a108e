"""A study's tables: the result table (rich, Markdown, LaTeX, CSV; --json is its dict), the list
of studies and the members table of the progress display and the study view.

Accuracies are shown in percent with two decimals, `mean ± std` over the seeds that finished
(sample std; a lone seed shows its mean alone). Rich tables are built with `fitted_table`, so
the identifying columns (variant, seeds, study id, state, run id) stay whole at any width and
the least important columns are dropped first, with a caption saying so.
"""

from __future__ import annotations

import csv
import io
import time
from typing import Any

from rich.table import Table

from engine.studies import toml_value
from mamlpp_tui.tables import Column, fitted_table

ACC_HELP = ("test accuracy: the top-k ensemble's (ensemble.json), mean ± std over finished "
            "seeds; best epoch: the best single validation-selected epoch on the same test "
            "tasks; best val: best validation accuracy; 95% CI: each seed's ensemble CI")


def pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def mean_std(mean: float | None, std: float | None, pm: str = "±") -> str:
    if mean is None:
        return "-"
    return pct(mean) if std is None else f"{pct(mean)} {pm} {pct(std)}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def speed(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def seeds_cell(row: dict[str, Any]) -> str:
    """`3/3`, or `1/3, 1 running, 1 not started` while members are unfinished."""
    text = f"{row['finished']}/{row['seeds']}"
    rest = ", ".join(f"{n} {state}" for state, n in sorted(row["unfinished"].items()))
    return f"{text}: {rest}" if rest else text


def ci_cell(row: dict[str, Any]) -> str:
    return " ".join(f"±{pct(c)}" for c in row["ci95"] if c is not None) or "-"


def _values(row: dict[str, Any], pm: str = "±") -> list[str]:
    return [row["variant"], seeds_cell(row),
            mean_std(row["test_accuracy_mean"], row["test_accuracy_std"], pm),
            mean_std(row["best_epoch_test_accuracy_mean"], row["best_epoch_test_accuracy_std"],
                     pm),
            mean_std(row["best_val_accuracy_mean"], None, pm),
            " ".join(f"{pm}{pct(c)}" for c in row["ci95"] if c is not None) or "-",
            duration(row["wall_s_mean"]), speed(row["iters_per_sec_mean"])]


HEADERS = ["variant", "seeds", "test acc %", "best epoch %", "best val %", "95% CIs",
           "wall/run", "it/s"]


def title(table: dict[str, Any]) -> str:
    seeds = ",".join(map(str, table["seeds"]))
    return (f"study {table['study']}: {table['kind']} of {table['base']}, seeds {seeds}, "
            f"{table['state']} ({table['finished']}/{table['members_total']} runs)")


def results_table(table: dict[str, Any], width: int, titled: bool = True) -> Table:
    """The rich result table of `mamlpp study show` (the study view has the title above)."""
    justify = ["left", "left", "right", "right", "right", "left", "right", "right"]
    priority = [0, 0, 9, 6, 5, 4, 3, 2]
    columns = [Column(h, identifying=i < 2, priority=p, justify=j)
               for i, (h, p, j) in enumerate(zip(HEADERS, priority, justify))]
    return fitted_table(columns, [_values(r) for r in table["rows"]], width,
                        title=title(table) if titled else None)


def markdown(table: dict[str, Any]) -> str:
    lines = [f"<!-- {title(table)} -->", "| " + " | ".join(HEADERS) + " |",
             "|" + "|".join(["---"] * 2 + ["---:"] * 3 + ["---"] + ["---:"] * 2) + "|"]
    for row in table["rows"]:
        cells = [c.replace("|", "\\|") for c in _values(row)]
        cells[0] = f"`{cells[0]}`"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}"}


def _latex(text: str) -> str:
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)


def latex(table: dict[str, Any]) -> str:
    """A booktabs tabular; accuracies in percent."""
    headers = [_latex(h) for h in HEADERS]
    lines = [f"% {_latex(title(table))}", r"\begin{tabular}{llrrrlrr}", r"\toprule",
             " & ".join(headers) + r" \\", r"\midrule"]
    for row in table["rows"]:
        cells = [_latex(c).replace("±", r"$\pm$") for c in _values(row)]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["variant", "overrides", "seeds", "finished", "test_accuracy_mean",
              "test_accuracy_std", "best_epoch_test_accuracy_mean",
              "best_epoch_test_accuracy_std", "best_val_accuracy_mean", "best_val_accuracy_std",
              "ci95_per_seed", "wall_s_mean", "iters_per_sec_mean"]


def csv_text(table: dict[str, Any]) -> str:
    """One line per row, accuracies as fractions (as in --json); lists joined with ';'."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for row in table["rows"]:
        values = dict(row, overrides=";".join(f"{k}={toml_value(v)}"
                                              for k, v in row["overrides"].items()),
                      ci95_per_seed=";".join(repr(c) for c in row["ci95"]))
        writer.writerow(["" if values[f] is None else values[f] for f in CSV_FIELDS])
    return out.getvalue()


def studies_table(rows: list[dict[str, Any]], width: int) -> Table:
    """`mamlpp studies`."""
    cells = [[r["id"], r["state"], f"{r['finished']}/{r['members']}", r["kind"], r["base"],
              time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"]))] for r in rows]
    return fitted_table(
        [Column("study", identifying=True), Column("state", identifying=True),
         Column("runs done", priority=5), Column("kind", priority=4),
         Column("base", priority=3), Column("created", priority=1)],
        cells, width, title="studies")


def members_cells(m: dict[str, Any]) -> list[str]:
    """variant, seed, state, progress, test accuracy, run id of one member (study view)."""
    total = m.get("total_iterations") or 0
    progress = f"{m['iteration']}/{total}" if total else "-"
    if total and m["state"] not in ("finished", "not started"):
        progress += f" {100 * m['iteration'] / total:.0f}%"
    test = pct(m["test_accuracy"])
    if m["ci95"] is not None:
        test += f" ±{pct(m['ci95'])}"
    return [m["variant"], str(m["seed"]), m["state"], progress, test, m["run"] or "-"]


def variant_matrix(variants: list[Any], width: int, base: dict[str, Any] | None) -> list[Any]:
    """`mamlpp ablate --list`: which technique each variant switches on (engine.ablation
    Variant objects), then what each switch sets; `base` gives derivative-order annealing's
    "on" value."""
    from engine import ablation

    techniques = list(ablation.TECHNIQUES)
    rows = [[v.name, *("on" if t in v.on else "-" for t in techniques), v.note]
            for v in variants]
    matrix = fitted_table(
        [Column("variant", identifying=True),
         *(Column(t.upper(), identifying=True, justify="center") for t in techniques),
         Column("note", wrap=True, min_width=12, priority=1)],
        rows, width, title="ablation variants", note="a wider terminal shows all")
    switches = []
    for technique, keys in ablation.TECHNIQUES.items():
        for key, (off, on) in keys.items():
            if on == ablation.BASE:
                section, name = key.split(".")
                on = base[section][name] if base else "the base config's value"
            switches.append([technique.upper(), key, _show(off), _show(on)])
    for key, value in ablation.ALWAYS.items():
        switches.append(["(every row)", key, _show(value), _show(value)])
    legend = fitted_table(
        [Column("technique", identifying=True), Column("--set key", identifying=True),
         Column("off", identifying=True), Column("on", wrap=True, min_width=8, priority=1)],
        switches, width, title="what each switch sets")
    return [matrix, legend]


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
