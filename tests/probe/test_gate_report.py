"""The declared gate (selection on val, PASS rule), mean ± std and best F1, and the Markdown / JSON report."""

import dataclasses
import json
import math
from datetime import datetime, timezone
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from avlm.errors import ConfigError
from avlm.probe import (
    CellResult,
    GateConfig,
    ProbeReport,
    SanityResult,
    ablation_table,
    cell_metrics,
    decide,
    evidence_tags,
    gate_metrics,
    render_markdown,
    report_json,
    run_table,
)
from avlm.stats import best_f1, format_mean_std, mean_std
from avlm.tracking.plots import probe_cells

GRID = [("mean", "adamw"), ("mean", "sgd"), ("attentive", "adamw")]
SEEDS = (1, 2, 3)
CLEAN_SANITY = [SanityResult("split_hygiene", True, {"id_overlap": 0}, "disjoint"), SanityResult("shuffled", True)]


def make_cells(val_deltas, test_deltas=None, seeds=SEEDS):
    """Cells of GRID whose per-seed val delta averages to ``val_deltas[i]`` (seed spread ±0.005) for config i."""
    cells = []
    for i, (pooling, optimizer) in enumerate(GRID):
        for seed in seeds:
            rand_val, rand_test = 0.55 + 0.01 * seed, 0.5 + 0.02 * seed
            spread = 0.005 * (seed - 2)  # sums to 0 over seeds 1, 2, 3: the mean delta is exactly the one asked for
            cells.append(
                CellResult(
                    pooling=pooling,
                    optimizer=optimizer,
                    seed=seed,
                    pre_val=rand_val + val_deltas[i] + spread,
                    rand_val=rand_val,
                    pre_test=None if test_deltas is None else rand_test + test_deltas[i] + spread,
                    rand_test=None if test_deltas is None else rand_test,
                    pre_best_f1=0.70 + 0.01 * seed,
                    rand_best_f1=0.65 + 0.01 * seed,
                )
            )
    return cells


def test_mean_std_is_numpy_mean_and_sample_std():
    values = [0.5587, 0.5797, 0.6661]
    mean, std = mean_std(values)
    assert mean == np.mean(values) and std == np.std(values, ddof=1)
    assert mean_std([0.7]) == (0.7, 0.0)
    assert mean_std(np.array([1, 2, 3, 4])) == (2.5, pytest.approx(np.std([1, 2, 3, 4], ddof=1)))
    with pytest.raises(ValueError, match="at least one"):
        mean_std([])
    assert format_mean_std(0.60153, 0.04651) == "0.6015 ± 0.0465"
    assert format_mean_std(0.5, 0.25, digits=2) == "0.50 ± 0.25"


def brute_force_best_f1(y_true, scores):
    """Every distinct score as a threshold (predict positive when score >= threshold), best F1 per class, mean."""
    per_class = []
    for k in range(y_true.shape[1]):
        positives = y_true[:, k] >= 0.5
        if not positives.any():
            continue
        best = 0.0
        for threshold in np.unique(scores[:, k]):
            predicted = scores[:, k] >= threshold
            tp = np.sum(predicted & positives)
            fp = np.sum(predicted & ~positives)
            fn = np.sum(~predicted & positives)
            best = max(best, 2 * tp / (2 * tp + fp + fn))
        per_class.append(best)
    return np.mean(per_class)


def test_best_f1_equals_brute_force():
    y_true = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=float)
    scores = np.array(
        [[0.9, 0.2, 0.1], [0.8, 0.3, 0.5], [0.4, 0.7, 0.2], [0.3, 0.1, 0.9], [0.1, 0.6, 0.3], [0.2, 0.65, 0.4]]
    )
    # Class 0: threshold 0.9 → P=1 R=1/3 (F1 0.5); 0.4 → TP 2 FP 1 FN 1 (F1 2/3); 0.1 → TP 3 FP 3 (F1 2/3).
    # Class 1: 0.65 → TP 2 FN 1 (F1 0.8); 0.3 → TP 3 FP 1 (F1 6/7). Class 2 has no positive and is left out.
    assert best_f1(y_true, scores) == pytest.approx((2 / 3 + 6 / 7) / 2)
    assert best_f1(y_true, scores) == pytest.approx(brute_force_best_f1(y_true, scores))
    rng = np.random.default_rng(0)
    y_random, s_random = (rng.random((50, 4)) < 0.3).astype(float), rng.normal(size=(50, 4))
    assert best_f1(y_random, s_random) == pytest.approx(brute_force_best_f1(y_random, s_random))


def test_best_f1_floor_of_uninformative_scores_is_all_positive_f1():
    prevalence = 0.25
    y_true = np.array([1, 0, 0, 0] * 5, dtype=float)
    assert best_f1(y_true, np.zeros(20)) == pytest.approx(2 * prevalence / (1 + prevalence))
    assert math.isnan(best_f1(np.zeros((4, 2)), np.ones((4, 2))))


def test_gate_passes_on_the_val_selected_config_with_numpy_figures():
    cells = make_cells([0.005, 0.03, 0.02])
    decision = decide(cells, CLEAN_SANITY, GateConfig())
    assert decision.passed and decision.sanity_passed
    assert (decision.gate_pooling, decision.gate_optimizer) == ("mean", "sgd")
    chosen = [c for c in cells if (c.pooling, c.optimizer) == ("mean", "sgd")]
    pre, rand = np.array([c.pre_val for c in chosen]), np.array([c.rand_val for c in chosen])
    assert decision.pre_mean == pytest.approx(np.mean(pre)) and decision.pre_std == pytest.approx(np.std(pre, ddof=1))
    assert decision.rand_mean == pytest.approx(np.mean(rand))
    assert decision.rand_std == pytest.approx(np.std(rand, ddof=1))
    assert decision.delta_mean == pytest.approx(0.03) and decision.delta_std == pytest.approx(0.005)
    assert decision.selected_on == decision.evaluated_on == "val" and decision.seeds == [1, 2, 3]
    assert decision.required_delta == 0.01
    assert any("optimistic" in reason for reason in decision.reasons)  # val selection and val evaluation


def test_a_failed_sanity_check_forces_fail_even_with_a_big_delta():
    sanity = [*CLEAN_SANITY, SanityResult("label_provenance", False, {}, "evaluated against train labels")]
    decision = decide(make_cells([0.3, 0.2, 0.1]), sanity, GateConfig())
    assert not decision.passed and not decision.sanity_passed and decision.delta_mean == pytest.approx(0.3)
    assert "label_provenance" in decision.reasons[0] and "evaluated against train labels" in decision.reasons[0]
    no_sanity = decide(make_cells([0.3, 0.2, 0.1]), [], GateConfig())
    assert not no_sanity.passed and "No sanity check ran" in no_sanity.reasons[0]


@pytest.mark.parametrize(
    "delta, passed", [(0.0099, False), (0.01 - 1e-9, False), (0.01, True), (0.0101, True), (-0.02, False)]
)
def test_required_delta_boundary(delta, passed):
    decision = decide(make_cells([delta, delta - 0.05, delta - 0.05]), CLEAN_SANITY, GateConfig(required_delta=0.01))
    assert decision.passed is passed and decision.delta_mean == pytest.approx(delta)


def test_round_off_does_not_fail_a_delta_equal_to_the_requirement():
    assert 0.57 - 0.56 < 0.01  # binary floats
    cells = [
        CellResult(pooling="mean", optimizer="sgd", seed=s, pre_val=0.57, rand_val=0.56, pre_best_f1=0, rand_best_f1=0)
        for s in SEEDS
    ]
    assert decide(cells, CLEAN_SANITY, GateConfig(required_delta=0.01)).passed


def test_evidence_tags_and_gate_metrics_read_back_the_decision_exactly():
    decision = decide(make_cells([0.005, 0.03, 0.02], [0.01, 0.025, 0.0]), CLEAN_SANITY, GateConfig(evaluate_on="test"))
    tags = evidence_tags(decision)
    assert (tags["gate"], tags["gate.pooling"], tags["gate.optimizer"]) == ("PASS", "mean", "sgd")
    assert tags["gate.evaluated_on"] == "test" and tags["gate.seeds"] == "1,2,3"
    for key in ("delta_mean", "delta_std", "pre_mean", "rand_mean", "required_delta"):
        assert float(tags[f"gate.{key}"]) == getattr(decision, key)  # repr strings: exact, not rounded
    assert tags["gate.reasoning"] == "\n".join(decision.reasons)
    assert gate_metrics(decision) == {
        "gate/passed": 1.0,
        "gate/delta_mean": decision.delta_mean,
        "gate/delta_std": decision.delta_std,
        "gate/pre_mean": decision.pre_mean,
        "gate/rand_mean": decision.rand_mean,
        "gate/required_delta": 0.01,
    }
    failed = decide(make_cells([0.0, 0.0, 0.0]), CLEAN_SANITY, GateConfig())
    assert evidence_tags(failed)["gate"] == "FAIL" and gate_metrics(failed)["gate/passed"] == 0.0


def test_cell_metrics_have_test_numbers_only_where_the_cell_has_them():
    with_test, without_test = make_cells([0.02] * 3, [0.01] * 3)[0], make_cells([0.02] * 3)[0]
    metrics = cell_metrics(with_test)
    assert metrics["delta_val_mAP"] == with_test.pre_val - with_test.rand_val
    assert metrics["delta_test_mAP"] == with_test.pre_test - with_test.rand_test
    assert metrics["pre_val_best_F1"] == with_test.pre_best_f1 and metrics["rand_test_mAP"] == with_test.rand_test
    assert set(cell_metrics(without_test)) == {
        "pre_val_mAP", "rand_val_mAP", "delta_val_mAP", "pre_val_best_F1", "rand_val_best_F1",
    }  # fmt: skip


def test_selection_uses_val_even_when_test_would_pick_another_config():
    # val prefers ("mean", "adamw"); test would prefer ("attentive", "adamw").
    cells = make_cells(val_deltas=[0.03, 0.0, 0.02], test_deltas=[0.004, 0.0, 0.10])
    on_test = decide(cells, CLEAN_SANITY, GateConfig(evaluate_on="test"))
    assert (on_test.gate_pooling, on_test.gate_optimizer) == ("mean", "adamw")
    assert on_test.evaluated_on == "test" and on_test.selected_on == "val"
    assert on_test.delta_mean == pytest.approx(0.004) and not on_test.passed  # the held-out number fails the gate
    test_pre = [c.pre_test for c in cells if (c.pooling, c.optimizer) == ("mean", "adamw")]
    assert on_test.pre_mean == pytest.approx(np.mean(test_pre))
    assert not any("optimistic" in reason for reason in on_test.reasons)
    on_val = decide(cells, CLEAN_SANITY, GateConfig(evaluate_on="val"))
    assert (on_val.gate_pooling, on_val.gate_optimizer) == ("mean", "adamw") and on_val.passed


def test_ties_go_to_the_first_configuration_in_grid_order():
    cells = make_cells([0.02, 0.03, 0.03])
    assert decide(cells, CLEAN_SANITY, GateConfig()).gate_pooling == "mean"
    reversed_grid = sorted(cells, key=lambda c: c.pooling)  # "attentive" now comes first
    assert decide(reversed_grid, CLEAN_SANITY, GateConfig()).gate_pooling == "attentive"


def test_a_configuration_with_a_nan_val_delta_is_never_chosen():
    cells = make_cells([float("nan"), 0.02, 0.015])
    decision = decide(cells, CLEAN_SANITY, GateConfig())
    assert (decision.gate_pooling, decision.gate_optimizer) == ("mean", "sgd") and decision.passed
    all_nan = decide(make_cells([float("nan")] * 3), CLEAN_SANITY, GateConfig())
    assert not all_nan.passed and any("finite" in reason for reason in all_nan.reasons)


def test_incomplete_grids_and_missing_test_numbers_are_errors():
    cells = make_cells([0.02, 0.03, 0.01])
    with pytest.raises(ValueError, match="empty"):
        decide([], CLEAN_SANITY, GateConfig())
    with pytest.raises(ValueError, match="appears twice"):
        decide([*cells, cells[0]], CLEAN_SANITY, GateConfig())
    with pytest.raises(ValueError, match=r"pooling=mean optimizer=sgd has seeds \[1, 3\]"):
        decide([c for c in cells if not (c.optimizer == "sgd" and c.seed == 2)], CLEAN_SANITY, GateConfig())
    with pytest.raises(ValueError, match=r"seeds \[1, 2, 3\] have no test numbers"):
        decide(cells, CLEAN_SANITY, GateConfig(evaluate_on="test"))


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"required_delta": float("nan")}, "required_delta"),
        ({"select_on": "test"}, "select_on"),
        ({"evaluate_on": "train"}, "evaluate_on"),
        ({"metric": "AUROC"}, "metric"),
    ],
)
def test_gate_config_rejects_bad_values(kwargs, key):
    with pytest.raises(ConfigError, match=f"gate.{key}"):
        GateConfig(**kwargs)


def test_ablation_and_run_tables():
    cells = make_cells([0.005, 0.03, 0.02], test_deltas=[0.0, 0.01, 0.02])
    rows = ablation_table(cells)
    assert [(r.pooling, r.optimizer) for r in rows] == GRID
    assert [r.delta_mean for r in rows] == pytest.approx([0.005, 0.03, 0.02])
    assert all(r.split == "val" and r.seeds == 3 and r.delta_std == pytest.approx(0.005) for r in rows)
    assert rows[0].pre_mean == pytest.approx(np.mean([c.pre_val for c in cells[:3]]))
    assert [r.delta_mean for r in ablation_table(cells, split="test")] == pytest.approx([0.0, 0.01, 0.02])
    runs = run_table(list(reversed(cells)))  # grid order of the input is kept, seeds ascend
    assert [(r.pooling, r.seed) for r in runs[:3]] == [("attentive", 1), ("attentive", 2), ("attentive", 3)]
    assert all(r.delta_val == pytest.approx(r.pre_val - r.rand_val) for r in runs)
    assert all(r.delta_test == pytest.approx(r.pre_test - r.rand_test) for r in runs)
    assert run_table(make_cells([0.0] * 3))[0].delta_test is None


def research_log_cells():
    """The mean_visible / adamw rows of the hand-written Day 7 probe report (its Run Metrics table)."""
    rows = [(1, 0.5857, 0.5925, 0.6803), (2, 0.5849, 0.6121, 0.6827), (3, 0.6508, 0.6003, 0.6602)]
    return [
        CellResult(
            pooling="mean_visible",
            optimizer="adamw",
            seed=seed,
            pre_val=pre,
            rand_val=rand,
            pre_best_f1=f1,
            rand_best_f1=f1,
        )
        for seed, pre, rand, f1 in rows
    ]


def make_report(cells, sanity=CLEAN_SANITY, gate=None, **kwargs):
    gate = gate or GateConfig()
    return ProbeReport(
        generated_at=datetime(2026, 2, 17, 8, 8, 38, 154926, tzinfo=timezone.utc),
        config_snapshot={"seeds": [1, 2, 3], "pooling_modes": ["mean_visible"], "epochs": 20, "ckpt": Path("a/b.pt")},
        sanity=sanity,
        gate=decide(cells, sanity, gate),
        ablation=ablation_table(cells),
        runs=run_table(cells),
        **kwargs,
    )


def test_markdown_has_the_research_log_sections_and_numbers():
    sanity = [
        *CLEAN_SANITY,
        SanityResult("tiny_subset_overfit", True, {"train_mAP": 0.70751, "threshold": 0.6}, "fits"),
    ]
    samples = [{"clip_index": 113, "sample_token": "684acda1", "timestamp": 1531885321412463}]
    text = render_markdown(make_report(research_log_cells(), sanity=sanity, alignment_samples=samples, title="Day 7"))
    pre, rand = [0.5857, 0.5849, 0.6508], [0.5925, 0.6121, 0.6003]
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert headings == [
        "# Day 7",
        "## Config Snapshot",
        "## Sanity Checks",
        "## PASS/FAIL Gate",
        "## Ablation Summary",
        "## Run Metrics",
        "## Alignment Samples",
        "## Decision Reasoning",
    ]
    for line in [
        "- Generated: `2026-02-17T08:08:38.154926+00:00`",
        "- Decision: **FAIL**",  # delta 0.0055 < 0.01
        "- seeds: `[1, 2, 3]`",
        "- ckpt: `a/b.pt`",
        "- all_passed: `True`",
        "- tiny_subset_overfit: `passed=True` `train_mAP=0.7075` `threshold=0.6000` — fits",
        "- pooling: `mean_visible`",
        f"- pretrained mean±std mAP: `{format_mean_std(*mean_std(pre))}`",
        f"- random mean±std mAP: `{format_mean_std(*mean_std(rand))}`",
        f"- delta mean±std: `{format_mean_std(*mean_std(np.subtract(pre, rand)))}`",
        "- required delta: `0.0100`",
        # the hand-written report's own Ablation Summary row
        "| mean_visible | adamw | 0.6071 | 0.6016 | 0.0055 |",
        "| pooling | optimizer | seed | pre_mAP | rand_mAP | delta_mAP | pre_bestF1 | rand_bestF1 |",
        "| mean_visible | adamw | 2 | 0.5849 | 0.6121 | -0.0272 | 0.6827 | 0.6827 |",
        "| 113 | 684acda1 | 1531885321412463 |",
    ]:
        assert line in text.splitlines(), line
    assert "pre_test_mAP" not in text
    reasoning = text.split("## Decision Reasoning\n\n")[1].splitlines()
    assert reasoning == [f"- {reason}" for reason in make_report(research_log_cells(), sanity=sanity).gate.reasons]


def test_markdown_shows_test_columns_and_a_pass():
    cells = make_cells([0.03, 0.0, 0.02], test_deltas=[0.02, 0.0, 0.1])
    text = render_markdown(make_report(cells, gate=GateConfig(evaluate_on="test")))
    assert "- Decision: **PASS**" in text and "- evaluated on: `test`" in text and "## Alignment Samples" not in text
    assert "| pooling | optimizer | seed | pre_mAP | rand_mAP | delta_mAP | pre_test_mAP | rand_test_mAP |" in text


def test_report_json_round_trips_with_nan_as_null():
    cells = make_cells([0.02, 0.03, 0.01])
    cells[0] = dataclasses.replace(cells[0], pre_best_f1=float("nan"))
    report = make_report(cells, alignment_samples=[{"clip_index": np.int64(3), "positives": np.float32(2.0)}])
    data = report_json(report)
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert data["decision"] == "PASS" and data["gate"]["gate_optimizer"] == "sgd" and data["gate"]["passed"] is True
    assert data["generated_at"] == "2026-02-17T08:08:38.154926+00:00"
    assert data["config_snapshot"]["ckpt"] == "a/b.pt"
    assert data["runs"][0]["pre_best_f1"] is None and data["runs"][0]["pre_test"] is None
    assert data["ablation"][1]["delta_mean"] == pytest.approx(0.03)
    assert data["sanity"][0] == {
        "name": "split_hygiene",
        "passed": True,
        "figures": {"id_overlap": 0},
        "message": "disjoint",
    }
    assert data["alignment_samples"] == [{"clip_index": 3, "positives": 2.0}]
    with pytest.raises(TypeError, match=r"report\.config_snapshot\.bad"):
        report_json(dataclasses.replace(report, config_snapshot={"bad": object()}))


def test_report_needs_a_timezone_aware_timestamp():
    report = make_report(make_cells([0.02, 0.03, 0.01]))
    with pytest.raises(ValueError, match="timezone-aware"):
        dataclasses.replace(report, generated_at=datetime(2026, 2, 17))


def test_probe_cells_plot_has_pretrained_and_random_error_bars_per_configuration():
    rows = ablation_table(make_cells([0.005, 0.03, 0.02]))
    fig = probe_cells(rows)
    try:
        ax = fig.axes[0]
        assert len(ax.containers) == 2  # one errorbar series each for pretrained and random init
        pretrained_points = np.asarray(ax.containers[0].lines[0].get_ydata(), dtype=float)
        np.testing.assert_allclose(pretrained_points, [r.pre_mean for r in rows])
        assert [t.get_text() for t in ax.get_xticklabels()] == ["mean\nadamw", "mean\nsgd", "attentive\nadamw"]
    finally:
        plt.close(fig)
