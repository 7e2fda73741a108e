"""The report page: one `index.html`, styles inline, figures as files beside it.

Self-contained by construction: the only URLs the page holds are the relative names of the
figure files written next to it (`<img src="losses.png">`, a link to `losses.svg`), no font,
script or stylesheet from the network, so it opens the same offline, from a zip or a mail.
Every text is escaped.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable, Sequence
from typing import Any

from mamlpp_tui.report.figures import Plot

CSS = """
:root { --ink: #1d1d1f; --dim: #666; --line: #ddd; --band: #f5f6f8; --accent: #1f77b4; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1640px; padding: 20px 28px 40px; color: var(--ink);
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
h1 { font-size: 22px; margin: 0 0 2px; }
h1 code { font-size: 20px; }
h2 { font-size: 16px; margin: 26px 0 8px; padding-bottom: 4px;
     border-bottom: 1px solid var(--line); }
h3 { font-size: 14px; margin: 0 0 6px; }
.sub { color: var(--dim); margin: 0 0 14px; }
code { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 12.5px; }
.cards { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
table { border-collapse: collapse; font-size: 13px; }
th, td { text-align: left; padding: 4px 12px 4px 0; border-bottom: 1px solid var(--line);
         vertical-align: top; }
th { color: var(--dim); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.kv th { width: 11em; }
.card { background: var(--band); border-radius: 8px; padding: 12px 16px; }
.state-finished { color: #217a2f; font-weight: 600; }
.state-failed { color: #b3261e; font-weight: 600; }
.state-running, .state-paused, .state-stopped { color: #8a5a00; font-weight: 600; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(620px, 1fr)); gap: 22px; }
figure { margin: 0; }
figure img { width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
figure.wide { grid-column: 1 / -1; }
figure.wide img { max-width: 1188px; }
figcaption { color: var(--dim); font-size: 12.5px; margin-top: 4px; }
figcaption a { color: var(--accent); }
.note { border: 1px dashed #bbb; border-radius: 6px; padding: 14px 16px; color: var(--dim);
        background: #fafafa; }
footer { margin-top: 30px; color: var(--dim); font-size: 12px; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = (),
          css: str = "") -> str:
    """An HTML table; cells are escaped text, columns listed in `numeric` right-aligned."""
    def cell(tag: str, i: int, value: Any) -> str:
        cls = ' class="num"' if i in numeric else ""
        return f"<{tag}{cls}>{esc(value)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>"
                   for row in rows)
    cls = f' class="{css}"' if css else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def key_values(rows: Iterable[tuple[str, Any]], raw: Sequence[str] = ()) -> str:
    """A two-column table of (label, value); values of labels in `raw` are trusted HTML."""
    body = "".join(f"<tr><th>{esc(k)}</th><td>{v if k in raw else esc(v)}</td></tr>"
                   for k, v in rows)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def state_html(state: str) -> str:
    return f'<span class="state-{esc(state)}">{esc(state)}</span>'


def card(title: str, content: str) -> str:
    return f'<div class="card"><h3>{esc(title)}</h3>{content}</div>'


def figure(plot: Plot, wide: bool = False) -> str:
    """A figure written by `build.save_plots` (PNG shown, SVG linked), or its note."""
    cls = ' class="wide"' if wide else ""
    if plot.figure is None:
        return (f"<figure{cls}><h3>{esc(plot.title)}</h3>"
                f'<div class="note">{esc(plot.note or "Not available.")}</div></figure>')
    w, h = plot.pixels or (0, 0)
    return (f"<figure{cls}><h3>{esc(plot.title)}</h3>"
            f'<img src="{esc(plot.name)}.png" width="{w}" height="{h}" '
            f'alt="{esc(plot.title)}">'
            f"<figcaption>{esc(plot.caption)} "
            f'<a href="{esc(plot.name)}.svg">SVG</a></figcaption></figure>')


def figures(plots: Sequence[Plot], wide: Sequence[str] = ()) -> str:
    return '<div class="grid">' + "".join(figure(p, p.name in wide) for p in plots) + "</div>"


def page(title: str, heading: str, subtitle: str, body: Sequence[str], source: str) -> str:
    made = time.strftime("%Y-%m-%d %H:%M:%S")
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{heading}</h1><p class=\"sub\">{subtitle}</p>"
            + "".join(body)
            + f"<footer>Made by <code>mamlpp report</code> on {esc(made)} from "
              f"<code>{esc(source)}</code>.</footer></body></html>\n")
