"""The winner and the summary from constructed children (pure): objective aggregates, paired deltas against a
baseline with their p-value, tie-breaks in order, then spec order; cells missing a seed cannot win."""

import json
import math

import pytest

from avlm.protocol.sweep import (
    ChildRun,
    build_result,
    choose_winner,
    representative_children,
    summarize_cells,
    summary_dict,
    summary_markdown,
    sweep_spec_from_dict,
)
from avlm.stats import paired_test

METRIC = "best/val/mAP"


def spec(cells, seeds=(0, 1, 2), **objective):
    return sweep_spec_from_dict(
        {
            "name": "w",
            "recipe": "train_cvs",
            "base_config": "examples/cvs/demo.yaml",
            "cells": [{"name": name, "overrides": {"train.lr": lr}} for name, lr in cells],
            "seeds": list(seeds),
            "objective": {"metric": METRIC, **objective.pop("objective", {})},
            **objective,
        }
    )


def children(table, status="FINISHED", extra=None):
    """cell -> seed -> value  ->  ChildRun list (one per (cell, seed), started in order)."""
    runs, clock = [], 0
    for cell, values in table.items():
        for seed, value in values.items():
            clock += 1
            metrics = {} if value is None else {METRIC: value}
            metrics.update((extra or {}).get(cell, {}))
            runs.append(ChildRun(f"{cell}-{seed}-{clock}", cell, seed, status, metrics, start_time=clock))
    return runs


def test_the_best_mean_wins_and_the_std_is_the_sample_std():
    s = spec([("a", 0.1), ("b", 0.2)])
    runs = representative_children(children({"a": {0: 0.5, 1: 0.6, 2: 0.7}, "b": {0: 0.6, 1: 0.7, 2: 0.8}}))
    cells = summarize_cells(s, runs)
    assert cells[1].mean == pytest.approx(0.7) and cells[1].std == pytest.approx(0.1)  # ddof=1
    assert cells[0].delta is None and cells[0].p_value is None  # no baseline declared
    assert choose_winner(s, cells) == ("b", "best mean best/val/mAP (max): 0.7000")
    assert choose_winner(spec([("a", 0.1), ("b", 0.2)], objective={"mode": "min"}), cells)[0] == "a"


def test_median_aggregate_ranks_by_the_median():
    table = {"a": {0: 0.1, 1: 0.9, 2: 0.9}, "b": {0: 0.8, 1: 0.8, 2: 0.8}}
    runs = representative_children(children(table))
    mean = spec([("a", 0.1), ("b", 0.2)])
    assert choose_winner(mean, summarize_cells(mean, runs))[0] == "b"
    median = spec([("a", 0.1), ("b", 0.2)], objective={"aggregate": "median"})
    assert choose_winner(median, summarize_cells(median, runs))[0] == "a"


def test_a_paired_delta_against_the_baseline_with_its_test():
    s = spec([("uniform", 0.1), ("anchored", 0.2), ("other", 0.3)], objective={"baseline": "uniform", "test": "ttest"})
    table = {
        "uniform": {0: 0.50, 1: 0.60, 2: 0.55},
        "anchored": {0: 0.53, 1: 0.61, 2: 0.59},
        "other": {0: 0.49, 1: 0.65, 2: 0.56},
    }
    cells = summarize_cells(s, representative_children(children(table)))
    by_name = {c.name: c for c in cells}
    assert by_name["uniform"].delta is None and math.isnan(by_name["uniform"].score)  # the reference
    assert by_name["anchored"].delta == pytest.approx((0.03 + 0.01 + 0.04) / 3)
    expected = paired_test([0.53, 0.61, 0.59], [0.50, 0.60, 0.55], "ttest").p_value
    assert by_name["anchored"].p_value == pytest.approx(expected)
    winner, reason = choose_winner(s, cells)
    assert winner == "anchored" and reason.startswith("best mean Δ best/val/mAP vs uniform (max): 0.0267")
    # every candidate worse than the baseline: the best of them still wins (the rule of a chain judges it)
    table["anchored"] = {0: 0.40, 1: 0.50, 2: 0.46}
    assert choose_winner(s, summarize_cells(s, representative_children(children(table))))[0] == "other"


def test_pairs_only_seeds_both_cells_finished():
    s = spec([("base", 0.1), ("new", 0.2)], seeds=(0, 1, 2), objective={"baseline": "base", "require_all_seeds": False})
    table = {"base": {0: 0.5, 1: 0.5, 2: 0.5}, "new": {0: 0.6, 1: 0.7, 2: None}}  # seed 2 logged no metric
    cells = {c.name: c for c in summarize_cells(s, representative_children(children(table)))}
    assert cells["new"].values == {0: 0.6, 1: 0.7} and cells["new"].failed_seeds == [2]
    assert cells["new"].delta == pytest.approx(0.15) and cells["new"].p_value is not None


def test_ties_go_to_the_tie_breaks_in_order_then_to_spec_order():
    extra = {
        "a": {"diag/fallback_frac": 0.3, "time/epoch_s": 5.0},
        "b": {"diag/fallback_frac": 0.1, "time/epoch_s": 9.0},
    }
    table = {"a": {0: 0.70, 1: 0.70}, "b": {0: 0.70, 1: 0.70}}
    runs = representative_children(children(table, extra=extra))
    no_breaks = spec([("a", 0.1), ("b", 0.2)], seeds=(0, 1))
    winner, reason = choose_winner(no_breaks, summarize_cells(no_breaks, runs))
    assert winner == "a" and "still tied (a, b), the first in spec order wins" in reason
    s = spec([("a", 0.1), ("b", 0.2)], seeds=(0, 1), tie_breaks=[{"metric": "diag/fallback_frac", "mode": "min"}])
    winner, reason = choose_winner(s, summarize_cells(s, runs))
    assert winner == "b" and "broken by diag/fallback_frac (min): 0.1000" in reason
    # the first tie-break that separates decides; one nobody logged is passed over
    s = spec(
        [("a", 0.1), ("b", 0.2)],
        seeds=(0, 1),
        tie_breaks=[
            {"metric": "not/logged"},
            {"metric": "time/epoch_s", "mode": "min"},
            {"metric": "diag/fallback_frac"},
        ],
    )
    assert choose_winner(s, summarize_cells(s, runs))[0] == "a"


def test_tie_tolerance_makes_close_aggregates_ties():
    extra = {"a": {"time/epoch_s": 9.0}, "b": {"time/epoch_s": 5.0}}
    runs = representative_children(children({"a": {0: 0.701}, "b": {0: 0.700}}, extra=extra))
    strict = spec([("a", 0.1), ("b", 0.2)], seeds=(0,), tie_breaks=[{"metric": "time/epoch_s", "mode": "min"}])
    assert choose_winner(strict, summarize_cells(strict, runs))[0] == "a"
    tolerant = spec(
        [("a", 0.1), ("b", 0.2)],
        seeds=(0,),
        objective={"tie_tolerance": 0.005},
        tie_breaks=[{"metric": "time/epoch_s", "mode": "min"}],
    )
    assert choose_winner(tolerant, summarize_cells(tolerant, runs))[0] == "b"


def test_a_cell_missing_a_seed_cannot_win_unless_allowed():
    table = {"a": {0: 0.9}, "b": {0: 0.5, 1: 0.5}}  # a's seed 1 failed
    runs = representative_children(children(table) + [ChildRun("a-1-x", "a", 1, "FAILED", {}, start_time=99)])
    s = spec([("a", 0.1), ("b", 0.2)], seeds=(0, 1))
    assert choose_winner(s, summarize_cells(s, runs))[0] == "b"
    lenient = spec([("a", 0.1), ("b", 0.2)], seeds=(0, 1), objective={"require_all_seeds": False})
    assert choose_winner(lenient, summarize_cells(lenient, runs))[0] == "a"
    nothing = representative_children([ChildRun("x", "a", 0, "FAILED", {}), ChildRun("y", "b", 0, "FAILED", {})])
    winner, reason = choose_winner(s, summarize_cells(s, nothing))
    assert winner == "" and reason.startswith("no eligible cell: a (no value for seed 0, 1)")


def test_a_retried_seed_is_represented_by_its_finished_child():
    first = ChildRun("old", "a", 0, "FAILED", {}, start_time=1)
    retry = ChildRun("new", "a", 0, "FINISHED", {METRIC: 0.5}, start_time=2)
    later_failure = ChildRun("later", "a", 0, "KILLED", {}, start_time=3)
    assert representative_children([first, retry, later_failure])["a"][0].run_id == "new"
    assert representative_children([first, later_failure])["a"][0].run_id == "later"


def test_summary_json_and_markdown_name_the_winner_and_what_failed():
    s = spec([("uniform", 0.1), ("anchored", 0.2)], seeds=(0, 1), objective={"baseline": "uniform"})
    runs = children({"uniform": {0: 0.5, 1: 0.6}, "anchored": {0: 0.55}}) + [
        ChildRun("anchored-1-x", "anchored", 1, "FAILED", {}, start_time=50)
    ]
    resolved = [type("R", (), {"cell": c, "config": {"train": {"lr": c.overrides["train.lr"]}}}) for c in s.cell_list()]
    result = build_result(s, "f" * 64, "p" * 32, runs, resolved)
    assert result.winner == "" and not result.complete  # anchored lacks seed 1
    assert [(cell, seed, child.status) for cell, seed, child in result.failed()] == [("anchored", 1, "FAILED")]
    data = json.loads(json.dumps(summary_dict(s, result)))  # valid JSON: no NaN
    assert data["failed"] == [{"cell": "anchored", "seed": 1, "status": "FAILED", "run_id": "anchored-1-x"}]
    assert data["cells"][1]["values"] == {"0": 0.55} and data["cells"][1]["delta"] == pytest.approx(0.05)
    markdown = summary_markdown(s, result)
    assert "| cell | overrides | best/val/mAP mean ± std | Δ vs uniform | p (wilcoxon) | n | |" in markdown
    assert "| anchored | `train.lr=0.2` | 0.5500 ± 0.0000 | +0.0500 | — | 1/2 | no value: seed 1 |" in markdown
    assert "- anchored seed 1: FAILED (run `anchored-1-x`" in markdown
    assert summary_markdown(s, result) == markdown  # deterministic

    runs = children({"uniform": {0: 0.5, 1: 0.6}, "anchored": {0: 0.55, 1: 0.66}})
    result = build_result(s, "f" * 64, "p" * 32, runs, resolved)
    assert result.winner == "anchored" and result.complete
    assert result.best_config == {"train": {"lr": 0.2}} and result.best_overrides == {"train.lr": 0.2}
    evidence = result.evidence("anchored", "uniform", [METRIC, "absent"])
    assert evidence.candidate == {METRIC: {"0": 0.55, "1": 0.66}, "absent": {}}
    assert evidence.baseline == {METRIC: {"0": 0.5, "1": 0.6}, "absent": {}}
    assert evidence.candidate_run_ids == [r.run_id for r in runs if r.cell == "anchored"]
    assert result.evidence("anchored", "", [METRIC]).baseline is None
