"""The AVE report (kind ``ave``) from runs logged by hand with MlflowClient, shaped like train_ave's: its table's
means and stds over seeds, the uniform budget that matches each anchored row, and the figure's plotted points."""

import csv
import io
import math
import statistics
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from matplotlib.container import ErrorbarContainer
from mlflow import MlflowClient
from report_runs import FakeSource, log_run, make_spec, record

from avlm.report import build_report, load_report_spec
from avlm.report.ave import budget_section, budget_to_match
from avlm.report.context import ReportContext
from avlm.report.figures import Point
from avlm.stats import format_mean_std
from avlm.tracking.run_table import RunReader

REPO = Path(__file__).resolve().parents[2]
SWEEP = "ave-budget"
TOKENS = {56: 490, 80: 1000, 112: 1960, 176: 4840}  # the demo's 10 × (r / 8)² tokens per clip
# configuration → val accuracy per seed 0, 1, 2
UNIFORM_VAL = {56: [0.50, 0.52, 0.54], 80: [0.60, 0.61, 0.65], 112: [0.70, 0.72, 0.71], 176: [0.80, 0.84, 0.82]}
ANCHORED_VAL = {1: [0.75, 0.77, 0.76], 2: [0.86, 0.88, 0.90]}
ANCHORED_FALLBACK = {1: [0.1, 0.2, 0.3], 2: [0.0, 0.0, 0.3]}
UNIFORM112_TEST = [0.66, 0.70, 0.71]


def ave_run(client, experiment, *, allocation, seed, base=112, k=2, val, fallback=0.0, test=None, sweep=SWEEP):
    """A train_ave run as the recipe logs it: cfg.* params, its tags, alloc/* and final/* metrics."""
    metrics = {"alloc/tokens_per_clip": TOKENS[base], "final/val_accuracy": val, "alloc/val_fallback_frac": fallback}
    metrics |= {"final/test_accuracy": test} if test is not None else {}
    name = f"ave-uniform{base}-seed{seed}" if allocation == "uniform" else f"ave-anchored_k{k}-learned-seed{seed}"
    return log_run(
        client,
        experiment,
        name=name,
        params={
            "cfg.seed": seed,
            "cfg.allocation.method": allocation,
            "cfg.allocation.base_resolution": base,
            "cfg.allocation.k": k,
            "cfg.eventness.method": "learned",
            "cfg.output_dir": f"outputs/{name}",
        },
        metrics=metrics,
        tags={
            "recipe": "ave",
            "allocation": allocation,
            "eventness": "learned" if allocation == "anchored" else "none",
            "token_budget": TOKENS[base],
            "avlm.sweep.name": sweep,
        },
    )


@pytest.fixture(scope="module")
def ave_runs(module_store):
    """The sweep's 18 children, its parent (no cfg.*) and a run of another sweep, in avlm-ave (logged once)."""
    client = MlflowClient()
    experiment = client.create_experiment("avlm-ave")
    for seed in (0, 1, 2):
        for base, values in UNIFORM_VAL.items():
            test = UNIFORM112_TEST[seed] if base == 112 else None
            ave_run(client, experiment, allocation="uniform", seed=seed, base=base, val=values[seed], test=test)
        for k, values in ANCHORED_VAL.items():
            ave_run(
                client, experiment, allocation="anchored", seed=seed, k=k, val=values[seed],
                fallback=ANCHORED_FALLBACK[k][seed],
            )  # fmt: skip
    log_run(client, experiment, name=f"sweep-{SWEEP}", tags={"avlm.sweep.name": SWEEP})
    ave_run(client, experiment, allocation="uniform", seed=0, base=56, val=0.1, sweep="other")
    return experiment


def example_spec(tmp_path):
    return load_report_spec(REPO / "examples/reports/ave_budget.yaml", [f"output_dir={tmp_path}"])


def context_of(spec):
    reader = RunReader()
    runs = reader.find_runs(spec.runs.experiments, spec.runs.filter, statuses=spec.runs.statuses)
    return runs, reader


def geometric_match(y, low, high):
    """Hand-computed: where the uniform line between budgets ``low`` and ``high`` reaches y, on a log budget axis."""
    y0, y1 = statistics.mean(UNIFORM_VAL[low]), statistics.mean(UNIFORM_VAL[high])
    t = (y - y0) / (y1 - y0)
    return math.exp(math.log(TOKENS[low]) + t * (math.log(TOKENS[high]) - math.log(TOKENS[low])))


def test_the_table_holds_each_configuration_mean_and_std_over_seeds(ave_runs, tmp_path):
    spec = example_spec(tmp_path)
    runs, reader = context_of(spec)
    built = build_report(spec, runs, reader, tmp_path / "ave")
    table = built.tables["ave_budget"]
    names = [row[0].text for row in table.rows]
    assert names == [*(f"uniform {r} px" for r in (56, 80, 112, 176)), *(f"anchored k={k} (learned)" for k in (1, 2))]
    assert table.columns == [
        "configuration", "allocation", "eventness", "k", "tokens per clip", "seeds", "val accuracy", "test accuracy",
        "val fallback", "uniform tokens to match", "group",
    ]  # fmt: skip
    expected = [(UNIFORM_VAL[r], TOKENS[r], [0.0] * 3) for r in (56, 80, 112, 176)]
    expected += [(ANCHORED_VAL[k], TOKENS[112], ANCHORED_FALLBACK[k]) for k in (1, 2)]
    for index, (values, tokens, fallback) in enumerate(expected):
        cell = dict(table.cell(index, "val accuracy").data)
        assert cell["mean"] == pytest.approx(statistics.mean(values)) and cell["n"] == 3
        assert cell["std"] == pytest.approx(statistics.stdev(values))
        text = format_mean_std(statistics.mean(values), statistics.stdev(values), 4)
        assert table.cell(index, "val accuracy").text == text
        assert table.cell(index, "tokens per clip").text == f"{tokens:,}"
        assert table.cell(index, "seeds").text == "0, 1, 2"
        assert dict(table.cell(index, "val fallback").data)["mean"] == pytest.approx(statistics.mean(fallback))
    assert [row[1].text for row in table.rows] == ["uniform"] * 4 + ["anchored"] * 2
    assert [row[2].text for row in table.rows] == ["none"] * 4 + ["learned"] * 2
    assert [row[3].text for row in table.rows] == ["n/a"] * 4 + ["1", "2"]
    # test accuracy: only uniform 112 evaluated test
    assert table.cell(2, "test accuracy").text == format_mean_std(0.69, statistics.stdev(UNIFORM112_TEST), 4)
    assert [table.cell(i, "test accuracy").text for i in (0, 1, 3, 4, 5)] == ["n/a"] * 5
    # anchored k=1 (0.76) sits between uniform 112 (0.71) and 176 (0.82): geometric interpolation on log tokens
    match = dict(table.cell(4, "uniform tokens to match").data)[""]
    assert match == pytest.approx(geometric_match(0.76, 112, 176))
    assert table.cell(4, "uniform tokens to match").text == f"{geometric_match(0.76, 112, 176):,.0f}"
    assert table.cell(5, "uniform tokens to match").text == "> 4,840"  # 0.88: above every uniform budget
    assert table.cell(0, "uniform tokens to match").text == "n/a"
    # the other sweep's run and the parent are not read; the CSV carries the raw figures
    assert sum(len(group.runs) for group in built.groups) == 18
    rows = list(csv.DictReader(io.StringIO((tmp_path / "ave/tables/ave_budget.csv").read_text())))
    assert float(rows[5]["val accuracy mean"]) == pytest.approx(0.88) and rows[5]["uniform tokens to match"] == ""
    assert built.targets[0].status == "met" and built.targets[0].measured == pytest.approx(0.88)
    assert {"figures/ave_accuracy_vs_budget.png", "figures/ave_accuracy_vs_budget.svg"} <= set(built.files)


def test_the_figure_plots_uniform_as_a_line_and_each_anchored_configuration_at_its_budget(ave_runs, tmp_path):
    spec = example_spec(tmp_path)
    runs, reader = context_of(spec)
    kept = [run for run in runs if any(name.startswith("cfg.") for name in run.params)]
    section = budget_section(ReportContext(spec, kept, reader))
    figure = section.figures[0].figure
    (ax,) = figure.axes
    bars = {c.get_label(): c for c in ax.containers if isinstance(c, ErrorbarContainer)}
    assert list(bars) == ["uniform", "anchored k=1 (learned)", "anchored k=2 (learned)"]

    def plotted(container):
        line, _, (bar_lines,) = container
        spreads = [(top[1] - bottom[1]) / 2 for bottom, top in bar_lines.get_segments()]
        return list(line.get_xdata()), list(line.get_ydata()), spreads

    xs, ys, spreads = plotted(bars["uniform"])
    assert xs == [490, 1000, 1960, 4840]
    assert ys == pytest.approx([statistics.mean(UNIFORM_VAL[r]) for r in (56, 80, 112, 176)])
    assert spreads == pytest.approx([statistics.stdev(UNIFORM_VAL[r]) for r in (56, 80, 112, 176)])
    assert bars["uniform"].lines[0].get_linestyle() == "-"  # a line through the budgets
    for k in (1, 2):
        xs, ys, spreads = plotted(bars[f"anchored k={k} (learned)"])
        assert xs == [1960] and ys == pytest.approx([statistics.mean(ANCHORED_VAL[k])])
        assert spreads == pytest.approx([statistics.stdev(ANCHORED_VAL[k])])
        assert bars[f"anchored k={k} (learned)"].lines[0].get_linestyle() == "None"  # a marker
    assert ax.get_xscale() == "log" and list(ax.get_xticks()) == [490, 1000, 1960, 4840]
    guides = sorted(line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() == ":")
    assert guides == pytest.approx([0.76, 0.88])  # each anchored accuracy, across to the uniform line
    assert [t.get_text() for t in ax.texts] == ["anchored k=1 (learned)", "anchored k=2 (learned)"]
    plt.close(figure)


def test_budget_to_match_interpolates_on_the_line_and_says_when_it_is_out_of_reach():
    line = [Point("a", 100, 0.4), Point("b", 400, 0.6), Point("c", 1600, 0.5)]
    assert budget_to_match(line, 0.5, log_x=True) == (pytest.approx(200.0), "200")  # first crossing: 100 → 400
    assert budget_to_match(line, 0.5, log_x=False)[0] == pytest.approx(250.0)
    assert budget_to_match(line, 0.7, log_x=True) == (None, "> 1,600")
    assert budget_to_match(line, 0.3, log_x=True) == (None, "< 100")
    assert budget_to_match([], 0.3, log_x=True) == (None, "n/a")


def test_runs_without_the_budget_metric_use_the_tag_and_one_seed_has_no_error_bar(tmp_path):
    runs = [
        record("u", seed=0, params={"cfg.allocation.method": "uniform", "cfg.allocation.base_resolution": "80"},
               tags={"allocation": "uniform", "token_budget": "1000"}, metrics={"final/val_accuracy": 0.6}),
        record("a", seed=0, params={"cfg.allocation.method": "anchored", "cfg.allocation.k": "1"},
               tags={"allocation": "anchored", "eventness": "oracle"}, metrics={"final/val_accuracy": 0.7}),
    ]  # fmt: skip
    spec = make_spec(kind="ave", runs={"experiments": ["e"]}, output_dir=str(tmp_path))
    section = budget_section(ReportContext(spec, runs, FakeSource()))
    table = section.tables[0]
    assert table.cell(0, "tokens per clip").text == "1,000" and table.cell(0, "val accuracy").text == "0.6000"
    assert table.cell(1, "tokens per clip").text == "n/a" and "test accuracy" not in table.columns
    (ax,) = section.figures[0].figure.axes
    (uniform,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]  # the anchored run has no budget
    assert list(uniform.lines[0].get_xdata()) == [1000] and uniform.get_label() == "uniform"
    plt.close(section.figures[0].figure)
