"""diagnose on a hand-made two-seed case: overall Δ, fallback, anchor precision / recall, buckets, harmful ranking."""

import json
import math

import pytest

from avlm.ave.diagnose import ClipOutcome, anchor_hits, diagnose, diagnose_markdown, read_outcomes, write_outcomes
from avlm.errors import DataError

HIGH = 176
LABELS = {
    "A": [0, 0, 1, 1, 1, 0, 0, 0, 0, 0],  # events at 2-4: length "3-5"
    "B": [2] * 10,  # "10"
    "C": [0] * 10,  # "0"
    "D": [0, 0, 0, 0, 0, 0, 3, 0, 0, 0],  # event at 6: "1-2"
}
# The candidate's plans: (anchors, {second: resolution} off the base, fallback reason or "")
PLANS = {
    0: {
        "A": ((3, 8), {3: 176, 8: 176}, ""),  # 2-high, distance 0
        "B": ((), {}, "flat_scores (std 0.01 < 0.2)"),
        "C": ((5,), {5: 176}, ""),  # 1-high, no_event
        "D": ((8, 2), {8: 176}, ""),  # 1-high (2 at mid = base), distance 2
    },
    1: {
        "A": ((3, 8), {3: 176, 8: 176}, ""),
        "B": ((), {}, "flat_scores (std 0.01 < 0.2)"),
        "C": ((5,), {5: 176}, ""),
        "D": ((), {}, "budget_infeasible (1 anchor and 2 neighbours leave 7 seconds for 20 tokens)"),
    },
}
# Correct seconds per clip: (candidate, baseline)
CORRECT = {
    0: {"A": (8, 6), "B": (10, 10), "C": (9, 10), "D": (7, 9)},
    1: {"A": (7, 7), "B": (9, 10), "C": (10, 10), "D": (10, 7)},
}


def predictions(labels, correct):
    """The labels with the first ``10 - correct`` seconds predicted as a wrong class."""
    return [(y + 1) % 4 if t < 10 - correct else y for t, y in enumerate(labels)]


def outcome(video_id, correct, anchors=(), resolutions=None, reason=""):
    return ClipOutcome(
        video_id=video_id,
        labels=LABELS[video_id],
        predictions=predictions(LABELS[video_id], correct),
        scores=[0.1 * t for t in range(10)],
        resolutions=resolutions or [112] * 10,
        anchors=list(anchors),
        fallback=bool(reason),
        reason=reason,
    )


def sides():
    candidate, baseline = {}, {}
    for seed, plans in PLANS.items():
        candidate[seed], baseline[seed] = {}, {}
        for v, (anchors, off_base, reason) in plans.items():
            resolutions = [off_base.get(t, 112) for t in range(10)]
            candidate[seed][v] = outcome(v, CORRECT[seed][v][0], anchors, resolutions, reason)
            baseline[seed][v] = outcome(v, CORRECT[seed][v][1])
    return candidate, baseline


def test_diagnose_equals_hand_computed_figures():
    candidate, baseline = sides()
    report = diagnose(candidate, baseline, high_resolution=HIGH)
    json.dumps(report, allow_nan=False)  # JSON as it is
    assert report["seeds"] == [0, 1] and report["clips"] == 4
    # seed 0: 34 vs 35 of 40 seconds; seed 1: 36 vs 34
    acc = report["accuracy"]
    assert acc["candidate"] == pytest.approx((0.85 + 0.9) / 2)
    assert acc["baseline"] == pytest.approx((0.875 + 0.85) / 2)
    assert acc["delta"] == pytest.approx((-0.025 + 0.05) / 2)
    assert [s["delta"] for s in acc["per_seed"]] == pytest.approx([-0.025, 0.05])

    # fallback: B twice, D in seed 1, of 8 (seed, clip) pairs
    assert report["fallback"] == {
        "frac": 3 / 8,
        "baseline_frac": 0.0,
        "reasons": {"flat_scores": 2, "budget_infeasible": 1},
    }
    # non-fallback pairs: A (3 on event, 8 not) ×2, C (no event), D seed 0 (8, 2 off event 6): 2 of 8 anchors;
    # event clips A, A, D: A's anchors hit twice → 2 of 3
    assert report["anchors"] == {
        "precision": 0.25,
        "recall": pytest.approx(2 / 3),
        "anchors": 8,
        "on_event": 2,
        "event_clips": 3,
        "event_clips_hit": 2,
    }

    def figures(clips, cand, base, delta):
        return {
            "clips": clips,
            "candidate": pytest.approx(cand),
            "baseline": pytest.approx(base),
            "delta": pytest.approx(delta),
        }

    b = report["buckets"]
    # n_anchors "0": seed 0 {B}: 1.0 vs 1.0; seed 1 {B, D}: 19/20 vs 17/20
    assert b["n_anchors"] == {
        "0": figures(1.5, (1.0 + 0.95) / 2, (1.0 + 0.85) / 2, (0.0 + 0.1) / 2),
        "1": figures(1.0, (0.9 + 1.0) / 2, 1.0, (-0.1 + 0.0) / 2),
        "2": figures(1.5, (0.75 + 0.7) / 2, (0.75 + 0.7) / 2, 0.0),  # seed 0 {A, D}: 15/20 both; seed 1 {A}
    }
    assert list(b["anchor_event_distance"]) == ["0", "2", "no_event", "no_anchor"]
    assert b["anchor_event_distance"]["0"] == figures(1.0, 0.75, 0.65, 0.1)
    assert b["anchor_event_distance"]["2"] == figures(0.5, 0.7, 0.9, -0.2)  # D in seed 0 only
    assert b["anchor_event_distance"]["no_anchor"] == b["n_anchors"]["0"]
    assert list(b["regime"]) == ["fallback", "1-high", "2-high"]
    assert b["regime"]["1-high"] == figures(1.5, (0.8 + 1.0) / 2, (0.95 + 1.0) / 2, (-0.15 + 0.0) / 2)  # {C, D}, {C}
    assert b["regime"]["2-high"] == figures(1.0, 0.75, 0.65, 0.1)
    assert list(b["event_length"]) == ["0", "1-2", "3-5", "10"]
    assert b["event_length"]["1-2"] == figures(1.0, (0.7 + 1.0) / 2, (0.9 + 0.7) / 2, (-0.2 + 0.3) / 2)
    assert b["event_length"]["10"] == figures(1.0, (1.0 + 0.9) / 2, 1.0, (0.0 - 0.1) / 2)

    # Δ < 0 buckets, most seconds lost per seed first; ties by Δ, then bucket order, then value order
    assert [(h["bucket"], h["value"], h["seconds_lost"]) for h in report["harmful"]] == [
        ("regime", "1-high", 1.5),  # (19 − 16 + 0) / 2
        ("anchor_event_distance", "2", 1.0),  # (9 − 7) / 2
        ("n_anchors", "1", 0.5),
        ("anchor_event_distance", "no_event", 0.5),
        ("event_length", "0", 0.5),
        ("event_length", "10", 0.5),
    ]
    assert report["harmful"][0] == {
        "bucket": "regime",
        "value": "1-high",
        "clips": 1.5,
        "delta": pytest.approx(-0.075),
        "seconds_lost": 1.5,
    }


def test_diagnose_markdown_shows_the_tables():
    report = diagnose(*sides(), high_resolution=HIGH)
    report.update(candidate="anchored_k2", stage="quick", split="test")
    text = diagnose_markdown(report)
    assert text.startswith("# Diagnose: anchored_k2\n\nStage quick, split test.\n")
    assert "| mean | 0.8750 | 0.8625 | +0.0125 |" in text
    assert "fell back to uniform on 37.5% of (seed, clip) pairs (baseline: 0.0%)" in text
    assert "| budget_infeasible | 1 |" in text
    assert "precision 0.2500 (2 of 8 anchors on an event second), recall 0.6667 (2 of 3 event clips" in text
    assert "| 1-high | 1.5 | 0.9000 | 0.9750 | -0.0750 |" in text
    assert "| regime | 1-high | 1.5 | -0.0750 | 1.50 |" in text
    assert text.index("### n_anchors") < text.index("### anchor_event_distance") < text.index("## Harmful buckets")


def test_no_harmful_bucket_says_so():
    candidate, baseline = sides()
    text = diagnose_markdown(diagnose(candidate, candidate, high_resolution=HIGH))
    assert "None: no bucket has Δ < 0." in text and "| mean | 0.8750 | 0.8750 | +0.0000 |" in text


def test_pairing_is_checked():
    candidate, baseline = sides()
    with pytest.raises(DataError, match=r"seeds \[0, 1\], the baseline \[0\]"):
        diagnose(candidate, {0: baseline[0]}, high_resolution=HIGH)
    short = {s: {v: o for v, o in clips.items() if v != "D"} for s, clips in baseline.items()}
    with pytest.raises(DataError, match=r"baseline's clips of seed 0 differ .*\(1 clips: D\)"):
        diagnose(candidate, short, high_resolution=HIGH)
    relabelled = {s: dict(clips) for s, clips in baseline.items()}
    relabelled[1]["C"] = ClipOutcome("C", [1] * 10, [1] * 10, [0.0] * 10, [112] * 10, [], False, "")
    with pytest.raises(DataError, match="seed 1, clip C: the candidate's labels differ"):
        diagnose(candidate, relabelled, high_resolution=HIGH)


def test_anchor_hits_nan_without_anchors_or_event_clips():
    candidate, _ = sides()
    hits = anchor_hits([candidate[0]["C"]])  # one anchor, no event second
    assert hits["anchor_precision"] == 0.0 and math.isnan(hits["anchor_recall"])
    assert all(math.isnan(v) for v in anchor_hits([candidate[0]["B"]]).values())  # fallback only


def test_outcomes_round_trip_and_bad_files_are_named(tmp_path):
    candidate, _ = sides()
    path = write_outcomes(tmp_path / "predictions" / "test.json", candidate[0])
    assert read_outcomes(path) == candidate[0]
    rows = json.loads(path.read_text())
    rows[2]["labels"] = rows[2]["labels"][:9]
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=rf"^outcomes file {path}, item \[2\]: clip C: 'labels' must hold 10 values"):
        read_outcomes(path)
    rows[2] = dict(rows[0])
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"item \[2\]: video id 'A' appears twice"):
        read_outcomes(path)
    path.write_text(json.dumps([{"video_id": "A"}]))
    with pytest.raises(DataError, match=r"item \[0\]: clip outcome: missing keys \['labels'"):
        read_outcomes(path)
    path.write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        read_outcomes(path)


def test_outcomes_take_numpy_values_and_refuse_bad_ones():
    import numpy as np

    o = ClipOutcome(
        "x", np.zeros(10, np.int64), np.ones(10, np.int64), np.linspace(0, 1, 10), (112,) * 10, (3,), False, ""
    )
    assert o.labels == [0] * 10 and type(o.labels[0]) is int and o.anchors == [3] and o.correct() == 0
    with pytest.raises(DataError, match=r"clip x: 'anchors' must be distinct seconds"):
        ClipOutcome("x", [0] * 10, [0] * 10, [0.0] * 10, [112] * 10, [3, 3], False, "")
    with pytest.raises(DataError, match=r"clip x: 'labels' must hold ints, got 0.5"):
        ClipOutcome("x", [0.5] * 10, [0] * 10, [0.0] * 10, [112] * 10, [], False, "")
