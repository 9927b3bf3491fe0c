"""avlm.stats against scipy and brute-force references: paired tests, bootstrap intervals, pooled statistics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.stats

import avlm.stats as stats_module
from avlm.metrics.classification import average_precision_per_class, mean_average_precision
from avlm.stats import (
    BLEU_STAT_FIELDS,
    METEOR_STAT_FIELDS,
    PAIRED_TESTS,
    CorpusBleu,
    CorpusMeteor,
    MeanAveragePrecision,
    WeightedStatistic,
    bootstrap_ci,
    clip_items,
    mean_std,
    paired_bootstrap,
    paired_test,
)

CANDIDATE = np.array([0.61, 0.58, 0.64, 0.60, 0.66, 0.59, 0.63])
BASELINE = np.array([0.57, 0.59, 0.60, 0.55, 0.61, 0.60, 0.58])


def test_mean_std_is_the_sample_std():
    mean, std = mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    assert std == pytest.approx(np.std([1.0, 2.0, 4.0], ddof=1))
    assert mean_std([3.0]) == (3.0, 0.0)


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_ttest_and_wilcoxon_are_scipys(alternative):
    ttest = paired_test(CANDIDATE, BASELINE, "ttest", alternative)
    reference = scipy.stats.ttest_rel(CANDIDATE, BASELINE, alternative=alternative)
    assert (ttest.statistic, ttest.p_value) == pytest.approx((reference.statistic, reference.pvalue), rel=1e-12)
    wilcoxon = paired_test(CANDIDATE, BASELINE, "wilcoxon", alternative)
    reference = scipy.stats.wilcoxon(CANDIDATE, BASELINE, alternative=alternative)
    assert (wilcoxon.statistic, wilcoxon.p_value) == pytest.approx((reference.statistic, reference.pvalue), rel=1e-12)
    assert ttest.n == wilcoxon.n == 7
    assert ttest.mean_delta == pytest.approx(np.mean(CANDIDATE - BASELINE))


def test_wilcoxon_drops_zero_differences():
    candidate, baseline = [0.5, 0.7, 0.9, 0.4, 0.8], [0.5, 0.6, 0.7, 0.1, 0.3]  # first pair tied
    with_zero = paired_test(candidate, baseline, "wilcoxon", "greater")
    without = scipy.stats.wilcoxon(candidate[1:], baseline[1:], alternative="greater")
    assert (with_zero.statistic, with_zero.p_value) == pytest.approx((without.statistic, without.pvalue))
    assert with_zero.n == 5  # n counts the pairs given, the tie included


def _sign_flip_p_values(deltas: np.ndarray) -> dict[str, float]:
    """Brute force: the mean difference under each of the 2**n sign flips."""
    observed = deltas.mean()
    flipped = np.array([np.mean(deltas * signs) for signs in itertools.product([1, -1], repeat=len(deltas))])
    slack = 1e-12  # flips equal to the observed value, up to float rounding, count as "as extreme"
    return {
        "greater": np.mean(flipped >= observed - slack),
        "less": np.mean(flipped <= observed + slack),
        "two-sided": np.mean(np.abs(flipped) >= abs(observed) - slack),
    }


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_permutation_is_exact_over_all_sign_flips(alternative):
    result = paired_test(CANDIDATE, BASELINE, "permutation", alternative)
    assert result.exact
    assert result.statistic == pytest.approx(np.mean(CANDIDATE - BASELINE))
    assert result.p_value == pytest.approx(_sign_flip_p_values(CANDIDATE - BASELINE)[alternative], abs=1e-12)


def test_permutation_turns_monte_carlo_above_twelve_pairs():
    rng = np.random.default_rng(5)
    baseline = rng.normal(size=13)
    candidate = baseline + rng.normal(0.3, 1.0, size=13)
    exact_p = _sign_flip_p_values(candidate - baseline)["greater"]
    result = paired_test(candidate, baseline, "permutation", "greater", n_resamples=20_000, seed=3)
    assert not result.exact
    assert result.p_value == pytest.approx(exact_p, abs=0.01)  # Monte Carlo error ~ sqrt(p(1-p)/20000) = 0.003
    assert paired_test(candidate, baseline, "permutation", "greater", n_resamples=20_000, seed=3) == result
    assert paired_test(candidate[:12], baseline[:12], "permutation").exact


def test_alternative_is_honoured():
    for test in PAIRED_TESTS:
        greater = paired_test(CANDIDATE, BASELINE, test, "greater")
        less = paired_test(CANDIDATE, BASELINE, test, "less")
        two_sided = paired_test(CANDIDATE, BASELINE, test, "two-sided")
        assert greater.p_value < 0.05 < 0.95 < less.p_value, test
        assert two_sided.p_value == pytest.approx(min(1.0, 2 * greater.p_value), rel=1e-9), test


@pytest.mark.parametrize("test", PAIRED_TESTS)
def test_no_difference_gives_p_one(test):
    result = paired_test([0.5, 0.6, 0.7], [0.5, 0.6, 0.7], test, "greater")
    assert (result.p_value, result.statistic, result.mean_delta) == (1.0, 0.0, 0.0)


def test_paired_test_refuses_bad_input():
    with pytest.raises(ValueError, match="pair one to one"):
        paired_test([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least 2 pairs"):
        paired_test([1.0], [0.0])
    with pytest.raises(ValueError, match="ttest, wilcoxon, permutation"):
        paired_test([1.0, 2.0], [0.0, 1.0], "sign")
    with pytest.raises(ValueError, match="alternative"):
        paired_test([1.0, 2.0], [0.0, 1.0], "ttest", "bigger")
    with pytest.raises(ValueError, match="NaN"):
        paired_test([1.0, float("nan")], [0.0, 1.0])


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_bootstrap_of_a_mean_is_scipys(method):
    values = np.random.default_rng(1).gamma(2.0, size=150)
    ours = bootstrap_ci(values, method=method, n_resamples=3000, seed=7)
    theirs = scipy.stats.bootstrap(
        (values,), np.mean, method=method, n_resamples=3000, rng=np.random.default_rng(7)
    ).confidence_interval
    assert (ours.low, ours.high) == pytest.approx((theirs.low, theirs.high), rel=1e-12)
    assert ours.estimate == pytest.approx(values.mean())
    assert (ours.method, ours.n_resamples, ours.seed, ours.confidence) == (method, 3000, 7, 0.95)


def test_bootstrap_ci_of_a_normal_mean_is_the_textbook_interval():
    values = np.random.default_rng(2).normal(10.0, 2.0, size=1000)
    half_width = 1.96 * values.std(ddof=1) / np.sqrt(values.size)
    for method in ("percentile", "bca"):
        ci = bootstrap_ci(values, method=method)
        assert ci.low == pytest.approx(values.mean() - half_width, abs=0.1 * half_width)
        assert ci.high == pytest.approx(values.mean() + half_width, abs=0.1 * half_width)


def test_every_statistic_path_sees_the_same_resamples(monkeypatch):
    values = np.random.default_rng(3).random(300)

    class WeightedMean(WeightedStatistic):
        def weighted(self, items, weights):
            return weights @ items / items.shape[0]

    reference = bootstrap_ci(values, n_resamples=500)
    for statistic in (lambda batch: batch.mean(axis=1), WeightedMean()):
        other = bootstrap_ci(values, statistic, n_resamples=500)
        assert (other.estimate, other.low, other.high) == pytest.approx(
            (reference.estimate, reference.low, reference.high), rel=1e-12
        )
    # Chunked draws and chunked evaluation (a tiny chunk budget) agree across paths as well.
    monkeypatch.setattr(stats_module, "_RESAMPLE_CHUNK_ELEMENTS", 1000)
    chunked = [bootstrap_ci(values, s, n_resamples=500) for s in (None, lambda b: b.mean(axis=1), WeightedMean())]
    assert all((c.low, c.high) == pytest.approx((chunked[0].low, chunked[0].high), rel=1e-12) for c in chunked)


def test_constant_items_give_a_point_interval():
    for method in ("percentile", "bca"):
        ci = bootstrap_ci(np.full(20, 0.3), method=method, n_resamples=200)
        assert ci.low == ci.high == pytest.approx(0.3)


def test_bootstrap_ci_refuses_bad_arguments():
    with pytest.raises(ValueError, match="bootstrap method"):
        bootstrap_ci([1.0, 2.0], method="basic")
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0, 2.0], confidence=95)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_ci([1.0, 2.0], n_resamples=0)
    with pytest.raises(ValueError, match="1-D"):
        bootstrap_ci(np.ones((3, 2)))
    with pytest.raises(ValueError, match="at least one item"):
        bootstrap_ci([])


def test_paired_bootstrap_of_identical_systems_has_p_one():
    values = np.random.default_rng(4).random(200)
    result = paired_bootstrap(values, values.copy(), n_resamples=1000)
    assert result.p_value == 1.0
    assert (result.delta.estimate, result.delta.low, result.delta.high) == (0.0, 0.0, 0.0)


def test_paired_bootstrap_finds_a_clearly_better_system():
    rng = np.random.default_rng(5)
    difficulty = rng.random(300)
    baseline = difficulty + rng.normal(0, 0.05, 300)
    candidate = difficulty + 0.05 + rng.normal(0, 0.05, 300)
    result = paired_bootstrap(candidate, baseline, n_resamples=2000)
    assert result.p_value == pytest.approx(2 / 2001)  # no resampled delta <= 0: the +1-corrected floor
    assert 0.0 < result.delta.low < result.delta.estimate < result.delta.high
    # Unpaired, the item difficulty would swamp the difference; paired, the interval is that of the differences.
    differences = bootstrap_ci(candidate - baseline, method="percentile", n_resamples=2000)
    assert (result.delta.low, result.delta.high) == pytest.approx((differences.low, differences.high), rel=1e-9)


def test_paired_bootstrap_p_value_counts_resampled_deltas():
    rng = np.random.default_rng(6)
    baseline = rng.random(80)
    candidate = baseline + rng.normal(0.02, 0.1, 80)
    result = paired_bootstrap(candidate, baseline, n_resamples=4000, seed=11)
    indices = np.random.default_rng(11).integers(0, 80, (4000, 80))
    deltas = candidate[indices].mean(axis=1) - baseline[indices].mean(axis=1)
    expected = 2 * (min(np.sum(deltas <= 0), np.sum(deltas >= 0)) + 1) / 4001
    assert result.p_value == pytest.approx(expected)
    assert 0.01 < result.p_value < 0.9


def test_paired_bootstrap_refuses_mismatched_items():
    with pytest.raises(ValueError, match="one shape"):
        paired_bootstrap([1.0, 2.0, 3.0], [1.0, 2.0])


def _bleu_reference(totals: np.ndarray, order: int) -> float:
    """pycocoevalcap's BleuScorer.compute_score on pooled totals, in plain Python."""
    testlen, reflen, guess, correct = totals[0], totals[1], totals[2:6], totals[6:10]
    bleu = 1.0
    for k in range(order):
        bleu *= (correct[k] + 1e-15) / (guess[k] + 1e-9)
    value = bleu ** (1.0 / order)
    ratio = (testlen + 1e-15) / (reflen + 1e-9)
    return value * np.exp(1 - 1 / ratio) if ratio < 1 else value


def test_corpus_bleu_pools_counts_and_lengths():
    # Two items: (testlen, closest reflen, guesses 1..4, matches 1..4).
    items = np.array([[5, 6, 5, 4, 3, 2, 4, 2, 1, 0], [8, 7, 8, 7, 6, 5, 6, 4, 2, 1]], dtype=float)
    assert items.shape[1] == len(BLEU_STAT_FIELDS)
    for order in (1, 2, 3, 4):
        assert CorpusBleu(order).value(items) == pytest.approx(_bleu_reference(items.sum(axis=0), order), rel=1e-15)
    short = items.copy()
    short[:, 1] += 10  # hypotheses much shorter than references: the brevity penalty applies
    assert CorpusBleu(2).value(short) == pytest.approx(_bleu_reference(short.sum(axis=0), 2), rel=1e-15)
    assert CorpusBleu(2).value(short) < CorpusBleu(2).value(items)
    with pytest.raises(ValueError, match="order"):
        CorpusBleu(5)


def test_corpus_meteor_formula():
    # A perfect one-chunk exact match of 4 words (2 content, 2 function) scores 1.
    perfect = np.zeros(len(METEOR_STAT_FIELDS))
    perfect[:4] = [4, 4, 2, 2]
    perfect[4:8] = [2, 2, 2, 2]  # exact module: test/ref content, test/ref function
    perfect[20:23] = [1, 4, 4]
    assert CorpusMeteor().value(perfect[None, :]) == 1.0
    # Two chunks: Fmean 1, fragmentation 2 / 4, penalty 0.6 * 0.5 ** 0.2.
    split = perfect.copy()
    split[20] = 2
    assert CorpusMeteor().value(split[None, :]) == pytest.approx(1 - 0.6 * 0.5**0.2)
    # Nothing matched: 0/0 scores 0, not NaN.
    empty = np.zeros((1, len(METEOR_STAT_FIELDS)))
    assert CorpusMeteor().value(empty) == 0.0


def test_map_statistic_is_avlms_map_on_every_resample():
    rng = np.random.default_rng(7)
    y_true = (rng.random((60, 4)) < 0.25).astype(float)
    y_true[:, 3] = 0.0
    y_true[0, 3] = 1.0  # a rare class: absent from some resamples, so skipped there as mean_average_precision does
    scores = np.round(rng.random((60, 4)) + 0.4 * y_true, 1)  # rounded: ties between clips
    items = clip_items(y_true, scores)
    assert MeanAveragePrecision().value(items) == pytest.approx(mean_average_precision(y_true, scores), abs=1e-12)
    assert MeanAveragePrecision([2]).value(items) == pytest.approx(
        average_precision_per_class(y_true, scores)[2], abs=1e-12
    )
    indices = rng.integers(0, 60, (25, 60))
    expected = [mean_average_precision(y_true[i], scores[i]) for i in indices]
    assert MeanAveragePrecision()(items[indices]) == pytest.approx(expected, abs=1e-12)
    ci = bootstrap_ci(items, MeanAveragePrecision(), n_resamples=300)
    assert ci.low < ci.estimate < ci.high
