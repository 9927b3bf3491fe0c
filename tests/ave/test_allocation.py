"""Token allocation: equal budgets per clip, the hand-computed plans, the gates, min_gap / shift and the checks."""

import dataclasses
import math

import numpy as np
import pytest

from avlm.ave import allocation as allocation_module
from avlm.ave.allocation import (
    AllocationConfig,
    ClipPlan,
    ConfidenceGate,
    allocation_budget,
    check_allocation,
    confidence,
    plan_clip,
    plan_clips,
    plan_summary,
    reason_code,
)
from avlm.config import config_from_dict
from avlm.errors import AvlmError, ConfigError, DataError

DEMO = {56: 49, 80: 100, 112: 196, 176: 484}  # patch 8
STUDY = {112: 49, 160: 100, 224: 196, 352: 484, 448: 784}  # patch 16
SCORES = np.array([0.1, 0.9, 0.2, 0.3, 0.8, 0.0, 0.5, 0.4, 0.6, 0.7])


@dataclasses.dataclass
class Recipe:
    """A recipe config holding the section, as the AVE recipe does (the loader names keys by their section)."""

    allocation: AllocationConfig = dataclasses.field(default_factory=AllocationConfig)


def anchored(**kwargs) -> AllocationConfig:
    return AllocationConfig(method="anchored", **kwargs)


def spent(plan: ClipPlan, tokens) -> int:
    return sum(tokens[r] for r in plan.resolutions)


# Every allocation of the study's grid: (config, tokens). All pass check_allocation.
ALLOCATIONS = {
    "uniform": (AllocationConfig(), DEMO),
    "k1": (anchored(k=1), DEMO),
    "k2": (anchored(k=2), DEMO),
    "k3_max_high2": (anchored(k=3), DEMO),
    "k2_max_high1": (anchored(k=2, max_high_anchors=1), DEMO),
    "k1_adjacent1": (anchored(k=1, adjacent=1), DEMO),
    "k1_adjacent2": (anchored(k=1, adjacent=2), DEMO),
    "k2_shift1": (anchored(k=2, shift=1), DEMO),
    "k2_gap3_lows56_80": (anchored(k=2, min_gap=3, low_resolutions=[56, 80]), DEMO),
    "k1_mid80_adjacent1": (anchored(k=1, adjacent=1, mid_resolution=80, low_resolutions=[56, 80]), DEMO),
    "gate_std": (anchored(k=2, gate=ConfidenceGate("std", 0.2)), DEMO),
    "study_uniform224": (AllocationConfig(base_resolution=224, high_resolution=352, low_resolutions=[160]), STUDY),
    "study_k2": (anchored(base_resolution=224, high_resolution=352, low_resolutions=[160]), STUDY),
    "study_k1_adjacent1_shift1": (
        anchored(base_resolution=224, high_resolution=352, low_resolutions=[112, 160], k=1, adjacent=1, shift=1),
        STUDY,
    ),
    "study_k2_max_high1": (
        anchored(base_resolution=224, high_resolution=352, low_resolutions=[160], max_high_anchors=1),
        STUDY,
    ),
}


@pytest.mark.parametrize("name", list(ALLOCATIONS))
def test_every_plan_spends_exactly_the_uniform_budget(name):
    cfg, tokens = ALLOCATIONS[name]
    check_allocation(cfg, tokens)
    budget = allocation_budget(cfg, tokens)
    assert budget == 10 * tokens[cfg.base_resolution]
    rng = np.random.default_rng(0)
    ids = [f"clip{i}" for i in range(200)]
    # random scores, peaks at the clip's edges (clipped neighbours), ties and flat clips
    scores = {v: rng.random(10) for v in ids[:150]}
    scores.update({v: np.eye(10)[i % 10] + np.eye(10)[(i + 1) % 10] for i, v in enumerate(ids[150:190])})
    scores.update({v: np.full(10, 0.5) for v in ids[190:]})
    plans = plan_clips(scores, ids, cfg, tokens)
    assert list(plans) == ids
    for plan in plans.values():
        assert plan.tokens == budget == spent(plan, tokens)
        assert len(plan.resolutions) == 10
    if cfg.method == "anchored":
        kept = [p for p in plans.values() if not p.fallback]
        assert len(kept) >= 150  # the test means something only if most clips are anchored
        for plan in kept:
            assert len(plan.anchors) == cfg.k
            assert all(abs(a - b) >= cfg.min_gap for a in plan.anchors for b in plan.anchors if a != b)
            highs = [a for a in plan.anchors if plan.resolutions[a] == cfg.high_resolution]
            assert highs == list(plan.anchors[: cfg.max_high_anchors])
    else:
        assert all(p.resolutions == (cfg.base_resolution,) * 10 and p.anchors == () for p in plans.values())


@pytest.mark.parametrize(
    ("kwargs", "anchors", "resolutions"),
    [
        # 2 × 484 + 2 × 196 + 6 × 100 = 1960: the two best-scored others (9, 8) stay at base
        ({}, (1, 4), (80, 176, 80, 80, 176, 80, 80, 80, 112, 112)),
        # 484 + 6 × 196 + 3 × 100: the three lowest-scored (5, 0, 2) drop to 80
        ({"k": 1}, (1,), (80, 176, 80, 112, 112, 80, 112, 112, 112, 112)),
        # neighbours 0 and 2 kept at base; of the other 7, the lowest three (5, 3, 7) drop
        ({"k": 1, "adjacent": 1}, (1,), (112, 176, 112, 80, 112, 80, 112, 80, 112, 112)),
        # anchors 1 → 2 and 4 → 5; the best others (1, 4) keep base
        ({"shift": 1}, (2, 5), (80, 112, 176, 80, 112, 176, 80, 80, 80, 80)),
        # anchor 4 at mid (= base): 484 + 196 + 5 × 196 + 3 × 100
        ({"max_high_anchors": 1}, (1, 4), (80, 176, 80, 112, 112, 80, 112, 112, 112, 112)),
    ],
)
def test_anchored_plans_equal_hand_computed_ones(kwargs, anchors, resolutions):
    plan = plan_clip(SCORES, anchored(**kwargs), DEMO)
    assert plan == ClipPlan(resolutions, anchors, fallback=False, reason="", confidence=plan.confidence, tokens=1960)
    assert math.isnan(plan.confidence)  # gate none


def test_the_mix_keeps_the_most_seconds_at_base_then_at_the_next_resolution():
    # tokens 10:1, 20:2, 30:3, 40:10; budget 30; one anchor (10) leaves 9 seconds for 20 tokens: 2b + m = 11;
    # most at base: b = 5, then m = 1, l = 3.
    tokens = {10: 1, 20: 2, 30: 3, 40: 10}
    cfg = anchored(base_resolution=30, high_resolution=40, low_resolutions=[10, 20], k=1)
    scores = np.array([0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.05])
    plan = plan_clip(scores, cfg, tokens)
    assert plan.anchors == (0,)
    # lowest three (9, 1, 2) at 10, the next (3) at 20, the best five at base
    assert plan.resolutions == (40, 10, 10, 20, 30, 30, 30, 30, 30, 10)
    assert plan.tokens == 30


def test_ties_pick_the_earlier_second_and_drop_the_later_one():
    plan = plan_clip(np.full(10, 0.5), anchored(k=1), DEMO)
    assert plan.anchors == (0,)
    assert plan.resolutions == (176, 112, 112, 112, 112, 112, 112, 80, 80, 80)


def test_min_gap_is_respected():
    scores = np.array([0.0, 0.1, 0.2, 0.3, 0.9, 0.8, 0.7, 0.05, 0.06, 0.04])
    assert plan_clip(scores, anchored(min_gap=1), DEMO).anchors == (4, 5)
    assert plan_clip(scores, anchored(min_gap=2), DEMO).anchors == (4, 6)
    assert plan_clip(scores, anchored(min_gap=3), DEMO).anchors == (4, 1)  # 5, 6, 3, 2 too close; 1 (0.1) next


def test_shift_clamps_to_the_clip_and_never_merges_anchors():
    scores = np.array([0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.8, 0.9])
    # 9 → 9 (clamped), 8 → 9 taken, 0 → 1
    assert plan_clip(scores, anchored(shift=1), DEMO).anchors == (9, 1)
    assert plan_clip(scores, anchored(shift=3), DEMO).anchors == (9, 3)
    assert plan_clip(scores, anchored(shift=-1, k=1), DEMO).anchors == (8,)
    assert plan_clip(np.eye(10)[0], anchored(shift=-2, k=1), DEMO).anchors == (0,)


def test_confidence_figures():
    ramp = np.arange(10.0)
    assert confidence(ramp, "std") == pytest.approx(math.sqrt(8.25))
    assert confidence(ramp, "top1_median") == pytest.approx(4.5)
    assert confidence(np.r_[np.ones(9), 3.0], "gini") == pytest.approx(0.9)  # one second holds everything
    assert confidence(np.r_[np.zeros(5), np.ones(5)], "gini") == pytest.approx(0.5)  # 50 / (2 × 10 × 5)
    assert confidence(np.full(10, 2.0), "gini") == 0.0
    assert math.isnan(confidence(ramp, "none"))


@pytest.mark.parametrize(
    ("kind", "threshold", "peaked_figure"), [("std", 0.1, 0.3), ("top1_median", 0.5, 1.0), ("gini", 0.5, 0.9)]
)
def test_each_gate_falls_back_on_flat_scores_and_not_on_peaked_ones(kind, threshold, peaked_figure):
    cfg = anchored(k=1, gate=ConfidenceGate(kind, threshold))
    flat = plan_clip(np.full(10, 0.5) + np.linspace(0, 1e-3, 10), cfg, DEMO)
    assert flat.fallback and flat.anchors == () and flat.resolutions == (112,) * 10 and flat.tokens == 1960
    assert flat.reason.startswith(f"flat_scores ({kind} ") and flat.reason.endswith(f" < {threshold:g})")
    assert reason_code(flat.reason) == "flat_scores"
    assert flat.confidence < threshold
    peaked = plan_clip(np.eye(10)[3], cfg, DEMO)
    assert not peaked.fallback and peaked.anchors == (3,) and peaked.reason == ""
    assert peaked.confidence == pytest.approx(peaked_figure)


def test_gate_none_never_falls_back():
    assert not plan_clip(np.full(10, 0.5), anchored(), DEMO).fallback


def test_reason_names_the_figures():
    plan = plan_clip(np.r_[np.zeros(9), 0.04], anchored(k=1, gate=ConfidenceGate("std", 0.2)), DEMO)
    assert plan.reason == "flat_scores (std 0.012 < 0.2)"


def test_an_arrangement_without_an_exact_mix_falls_back_budget_infeasible():
    # base 30 (3 tokens), low 10 (1), mid 20 (2), high 50 (5): budget 30. With both neighbours: 5 + 2 × 2 leaves
    # 7 seconds for 21 tokens (all base). An anchor at the clip's edge has one neighbour: 8 seconds for 23 tokens,
    # which no count of 3s and 1s makes.
    tokens = {10: 1, 20: 2, 30: 3, 50: 5}
    cfg = anchored(base_resolution=30, high_resolution=50, mid_resolution=20, low_resolutions=[10], k=1, adjacent=1)
    check_allocation(cfg, tokens)
    inside = plan_clip(np.eye(10)[4], cfg, tokens)
    assert inside.resolutions == (30, 30, 30, 20, 50, 20, 30, 30, 30, 30) and not inside.fallback
    edge = plan_clip(np.eye(10)[0], cfg, tokens)
    assert edge.fallback and edge.resolutions == (30,) * 10 and edge.anchors == ()
    assert edge.reason == "budget_infeasible (1 anchor and 1 neighbour leave 8 seconds for 23 tokens)"
    summary = plan_summary({"a": inside, "b": edge})
    assert summary["reason/budget_infeasible"] == 1.0 and summary["fallback_frac"] == 0.5


def test_check_allocation_refuses_an_infeasible_config_naming_the_key():
    with pytest.raises(ConfigError) as err:
        check_allocation(anchored(low_resolutions=[56]), DEMO)
    assert str(err.value).startswith(
        "config key 'allocation.low_resolutions': no mix of [56] pays for 2 anchors at 176 within 1960 tokens"
    )
    with pytest.raises(ConfigError, match=r"pays for 2 anchors at 176 \(\+ 4 neighbours at 112\)"):
        check_allocation(anchored(adjacent=1), DEMO)  # 2 × 484 + 4 × 196 leaves 4 seconds for 208 tokens


def test_check_allocation_refuses_resolutions_the_cache_lacks():
    with pytest.raises(ConfigError, match=r"^config key 'allocation.high_resolution': 224 is not among .*\[56, 80"):
        check_allocation(anchored(high_resolution=224), DEMO)
    with pytest.raises(ConfigError, match=r"^config key 'allocation.low_resolutions': 64"):
        plan_clip(SCORES, anchored(low_resolutions=[64]), DEMO)
    check_allocation(AllocationConfig(high_resolution=224), DEMO)  # uniform spends nothing at high


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"k": 0}, "k"),
        ({"base_resolution": 0}, "base_resolution"),
        ({"method": "anchored", "high_resolution": 112}, "high_resolution"),
        ({"method": "anchored", "low_resolutions": [112]}, "low_resolutions"),
        ({"low_resolutions": [80, 80]}, "low_resolutions"),
        ({"mid_resolution": 176}, "mid_resolution"),
        ({"min_gap": 0}, "min_gap"),
        ({"k": 4, "min_gap": 4}, "min_gap"),
        ({"k": 2, "adjacent": 3}, "adjacent"),
        ({"shift": 10}, "shift"),
        ({"max_high_anchors": 0}, "max_high_anchors"),
        ({"method": "greedy"}, "method"),
        ({"gate": {"kind": "entropy"}}, "gate.kind"),
        ({"gate": {"kind": "std", "threshold": -0.1}}, "gate.threshold"),
    ],
)
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=rf"^config key 'allocation\.{key}'"):
        config_from_dict(Recipe, {"allocation": kwargs})


@pytest.mark.parametrize("base", [56, 80, 112, 176])
def test_uniform_accepts_any_cached_base_whatever_the_anchored_keys_say(base):
    cfg = config_from_dict(AllocationConfig, {"method": "uniform", "base_resolution": base})
    assert allocation_budget(cfg, DEMO) == 10 * DEMO[base]
    assert plan_clips(None, ["a"], cfg, DEMO)["a"].resolutions == (base,) * 10
    with pytest.raises(ConfigError, match="allocation.high_resolution"):  # the same keys, anchored: refused
        config_from_dict(AllocationConfig, {"method": "anchored", "base_resolution": 176})


def test_config_from_a_mapping_with_a_nested_gate():
    cfg = config_from_dict(AllocationConfig, {"method": "anchored", "k": 1, "gate": {"kind": "gini", "threshold": 0.4}})
    assert cfg.gate == ConfidenceGate("gini", 0.4) and cfg.low_resolutions == [80]


def test_plan_clips_names_missing_and_bad_scores():
    with pytest.raises(DataError, match=r"lack 1 of 2 clips: b"):
        plan_clips({"a": SCORES}, ["a", "b"], anchored(), DEMO)
    with pytest.raises(DataError, match=r"^clip a: eventness scores must be 10 numbers"):
        plan_clips({"a": SCORES[:9]}, ["a"], anchored(), DEMO)
    with pytest.raises(DataError, match=r"^clip a: eventness scores must be finite"):
        plan_clips({"a": np.r_[SCORES[:9], np.nan]}, ["a"], anchored(), DEMO)
    assert plan_clips(None, ["a"], AllocationConfig(), DEMO)["a"].resolutions == (112,) * 10  # uniform needs none


def test_plan_clips_refuses_a_plan_off_budget(monkeypatch):
    def off_budget(scores, cfg, tokens):
        return ClipPlan((112,) * 9 + (80,), (), False, "", math.nan, 9 * 196 + 100)

    monkeypatch.setattr(allocation_module, "plan_clip", off_budget)
    with pytest.raises(AvlmError, match="spends 1864 tokens, not the budget 1960"):
        plan_clips({"a": SCORES}, ["a"], anchored(), DEMO)


def test_plan_summary_figures():
    cfg = anchored(gate=ConfidenceGate("top1_median", 0.4))
    plans = plan_clips(
        {"peak": np.eye(10)[2], "flat": np.full(10, 0.3), "ramp": SCORES}, ["peak", "flat", "ramp"], cfg, DEMO
    )
    summary = plan_summary(plans)
    # peak: anchors (2, 0) (tie → the earlier), ramp: (1, 4) (0.9 − 0.45 >= 0.4); flat falls back (0 < 0.4)
    assert plans["peak"].anchors == (2, 0)
    assert summary == {
        "clips": 3.0,
        "fallback_frac": pytest.approx(1 / 3),
        "anchors_mean": pytest.approx(4 / 3),
        "high_frac": pytest.approx(4 / 30),
        "tokens_mean": 1960.0,
        "confidence_mean": pytest.approx((1.0 + 0.0 + (0.9 - 0.45)) / 3),
        "reason/flat_scores": 1.0,
        "resolution_frac/80": pytest.approx(12 / 30),
        "resolution_frac/112": pytest.approx(14 / 30),
        "resolution_frac/176": pytest.approx(4 / 30),
    }
    assert plan_summary(plans.values()) == summary
