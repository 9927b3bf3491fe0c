"""Report tables: cells that carry their display text and their raw numbers, rendered as Markdown, HTML and CSV.

Formatting is fixed (``digits`` decimals, ``mean ± std``, ``n/a`` for a missing figure), and nothing in a table
depends on the time or the machine, so the same runs give byte-equal files.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import io
import math
from collections.abc import Sequence
from typing import Any

from avlm.report.grouping import Summary
from avlm.stats import format_mean_std

NOT_AVAILABLE = "n/a"


@dataclasses.dataclass(frozen=True)
class Cell:
    """One table cell.

    Attributes:
        text: what Markdown and HTML show.
        data: the CSV's columns for this cell, as ``(suffix, raw value)``: suffix ``""`` is the column itself,
            others become ``<column> <suffix>`` (``val mAP mean``, ``val mAP std``). Empty = the text.
    """

    text: str
    data: tuple[tuple[str, Any], ...] = ()


@dataclasses.dataclass
class Table:
    """A titled table with footnotes; ``name`` is its file name (``tables/<name>.md``)."""

    name: str
    title: str
    columns: list[str]
    rows: list[list[Cell]]
    notes: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        for row in self.rows:
            if len(row) != len(self.columns):
                raise ValueError(f"table {self.name}: a row has {len(row)} cells for {len(self.columns)} columns")

    def note(self, text: str) -> str:
        """Add a footnote (once) and return its marker, e.g. ``[1]``."""
        if text not in self.notes:
            self.notes.append(text)
        return f"[{self.notes.index(text) + 1}]"

    def cell(self, row: int, column: str) -> Cell:
        return self.rows[row][self.columns.index(column)]


def number_text(value: float | None, digits: int) -> str:
    """A figure with ``digits`` decimals; ``n/a`` for None, ``nan``/``inf`` as such."""
    if value is None:
        return NOT_AVAILABLE
    if not math.isfinite(value):
        return str(float(value))
    return f"{value:.{digits}f}"


def text_cell(text: Any) -> Cell:
    return Cell(str(text))


def number_cell(value: float | None, digits: int) -> Cell:
    return Cell(number_text(value, digits), (("", value),))


def count_cell(value: float | None) -> Cell:
    """An integer count with thousands separators (``147,074``)."""
    if value is None or not math.isfinite(value):
        return number_cell(value, 0)
    return Cell(f"{round(value):,}", (("", round(value)),))


def summary_cell(summary: Summary, digits: int, marker: str = "") -> Cell:
    """``mean ± std`` over seeds; one seed shows its value alone; a missing metric ``n/a``; ``marker`` after it."""
    if summary.n == 0:
        text = NOT_AVAILABLE
    elif summary.n == 1:
        text = number_text(summary.mean, digits)
    else:
        text = format_mean_std(summary.mean, summary.std, digits)
    if summary.n and summary.n < summary.of:
        text += f" (n={summary.n} of {summary.of})"
    text += f" {marker}" if marker else ""
    return Cell(text, (("mean", summary.mean), ("std", summary.std if summary.n > 1 else None), ("n", summary.n)))


def interval_cell(estimate: float | None, low: float | None, high: float | None, digits: int) -> Cell:
    """``estimate [low, high]``; ``n/a`` parts for missing ones."""
    if estimate is None:
        text = NOT_AVAILABLE
    elif low is None or high is None:
        text = f"{number_text(estimate, digits)} [{NOT_AVAILABLE}]"
    else:
        text = f"{number_text(estimate, digits)} [{number_text(low, digits)}, {number_text(high, digits)}]"
    return Cell(text, (("estimate", estimate), ("low", low), ("high", high)))


def _escape_markdown(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(table: Table, level: int = 3) -> str:
    """The table as GitHub Markdown: a heading, the table, its numbered footnotes."""
    lines = [f"{'#' * level} {table.title}", ""]
    lines.append("| " + " | ".join(_escape_markdown(c) for c in table.columns) + " |")
    lines.append("|" + "|".join(" --- " for _ in table.columns) + "|")
    lines += ["| " + " | ".join(_escape_markdown(cell.text) for cell in row) + " |" for row in table.rows]
    if not table.rows:
        lines.append("| " + " | ".join(["(no runs)"] + [""] * (len(table.columns) - 1)) + " |")
    if table.notes:
        lines.append("")
        lines += [f"[{i}] {_escape_markdown(note)}  " for i, note in enumerate(table.notes, 1)]
    return "\n".join(lines) + "\n"


def render_html(table: Table) -> str:
    """The table as an HTML fragment (``<section>`` with a ``<table>`` and its footnotes)."""
    e = html.escape
    lines = [f'<section class="table" id="{e(table.name)}">', f"<h3>{e(table.title)}</h3>", "<table>"]
    lines.append("<thead><tr>" + "".join(f"<th>{e(c)}</th>" for c in table.columns) + "</tr></thead>")
    lines.append("<tbody>")
    lines += ["<tr>" + "".join(f"<td>{e(cell.text)}</td>" for cell in row) + "</tr>" for row in table.rows]
    lines.append("</tbody>")
    lines.append("</table>")
    if table.notes:
        lines.append('<ol class="notes">' + "".join(f"<li>{e(note)}</li>" for note in table.notes) + "</ol>")
    lines.append("</section>")
    return "\n".join(lines) + "\n"


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest round-tripping text: fixed for a given float
    return str(value)


def render_csv(table: Table) -> str:
    """The table's raw figures: each cell's ``data`` as columns (``<column> mean``, ``<column> std``, …)."""
    headers: list[str] = []
    layout: list[list[str]] = []  # per column, its suffixes in order
    for index, column in enumerate(table.columns):
        suffixes: list[str] = []
        for row in table.rows:
            for suffix, _ in row[index].data or (("", None),):
                if suffix not in suffixes:
                    suffixes.append(suffix)
        suffixes = suffixes or [""]
        layout.append(suffixes)
        headers += [f"{column} {suffix}" if suffix else column for suffix in suffixes]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(headers)
    for row in table.rows:
        values = []
        for cell, suffixes in zip(row, layout, strict=True):
            data = dict(cell.data) if cell.data else {"": cell.text}
            values += [_csv_value(data.get(suffix)) for suffix in suffixes]
        writer.writerow(values)
    return buffer.getvalue()


def html_page(title: str, body: Sequence[str]) -> str:
    """A standalone HTML page around report fragments (no scripts, no external resources)."""
    style = (
        "body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #bbb;padding:.2em .5em;text-align:left}"
        "th{background:#eee}.notes{font-size:.85em;color:#444}img{max-width:100%}"
    )
    head = f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>'
    return f"{head}\n<style>{style}</style>\n</head>\n<body>\n" + "".join(body) + "</body>\n</html>\n"
