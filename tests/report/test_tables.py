"""Cells and tables: fixed formatting, footnotes, and the Markdown, HTML and CSV renderings."""

from avlm.report.grouping import Summary
from avlm.report.tables import (
    Table,
    count_cell,
    interval_cell,
    number_cell,
    render_csv,
    render_html,
    render_markdown,
    summary_cell,
    text_cell,
)


def test_summary_cells_show_mean_std_one_value_or_na():
    assert summary_cell(Summary(0.5, 0.14142, 2, 2), 4).text == "0.5000 ± 0.1414"
    assert summary_cell(Summary(0.5, 0.0, 1, 1), 4).text == "0.5000"  # one seed: no spread to show
    assert summary_cell(Summary(0.5, 0.1, 2, 3), 3).text == "0.500 ± 0.100 (n=2 of 3)"
    assert summary_cell(Summary(None, None, 0, 2), 4, "[1]").text == "n/a [1]"
    assert summary_cell(Summary(0.5, 0.0, 1, 1), 4).data == (("mean", 0.5), ("std", None), ("n", 1))


def test_numbers_counts_and_intervals():
    assert number_cell(None, 3).text == "n/a" and number_cell(float("nan"), 3).text == "nan"
    assert number_cell(-0.04832, 4).text == "-0.0483"
    assert count_cell(147074.0).text == "147,074"
    assert interval_cell(0.5, 0.4, 0.61, 2).text == "0.50 [0.40, 0.61]"
    assert interval_cell(0.5, None, None, 2).text == "0.50 [n/a]"


def table():
    t = Table("t", "A | table", ["group", "score"], rows=[[text_cell("a|b"), summary_cell(Summary(0.5, 0.1, 2, 2), 2)]])
    marker = t.note("why <n/a>")
    assert t.note("why <n/a>") == marker == "[1]"  # a note is added once
    t.rows.append([text_cell("c"), summary_cell(Summary(None, None, 0, 2), 2, marker)])
    return t


def test_markdown_escapes_pipes_and_numbers_footnotes():
    text = render_markdown(table())
    assert text.splitlines()[:5] == [
        "### A | table",
        "",
        "| group | score |",
        "| --- | --- |",
        "| a\\|b | 0.50 ± 0.10 |",
    ]
    assert "| c | n/a [1] |" in text and "[1] why <n/a>" in text


def test_html_escapes_and_csv_spreads_cells_into_raw_columns():
    assert "<td>a|b</td>" in render_html(table()) and "why &lt;n/a&gt;" in render_html(table())
    assert render_csv(table()).splitlines() == ["group,score mean,score std,score n", "a|b,0.5,0.1,2", "c,,,0"]
