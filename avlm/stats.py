"""Statistics over seeds and items: paired tests, bootstrap confidence intervals (pure functions; scipy where it can).

Over seeds (a handful of values per system, paired by seed):

- :func:`mean_std` (sample std, ``ddof=1``) and :func:`format_mean_std`;
- :func:`paired_test` -> :class:`PairedTestResult`, the test one of :data:`PAIRED_TESTS`: ``ttest``
  (``scipy.stats.ttest_rel``), ``wilcoxon`` (``scipy.stats.wilcoxon``, zero differences dropped), ``permutation``
  (sign flips, exact over all ``2**n`` up to :data:`EXACT_PERMUTATION_MAX_PAIRS` pairs, Monte Carlo above).

Over items (one system's per-item scores or per-item sufficient statistics, e.g. 1,000 captions):

- :func:`bootstrap_ci` -> :class:`ConfidenceInterval`: percentile or BCa interval, 10,000 resamples and seed 0 by
  default, resamples drawn as ``scipy.stats.bootstrap`` draws them;
- :func:`paired_bootstrap` -> :class:`PairedBootstrapResult`: the interval and two-sided p-value of the difference
  between two systems scored on the same items, items resampled jointly.

The ``statistic`` of both is None for the mean of per-item scores (CIDEr-D, SPICE, SPIDEr, ROUGE-L, any per-item
AP or accuracy; the fast path), any callable of a batch of resamples (b, n, ...) -> (b,), or a
:class:`WeightedStatistic`, which is evaluated from per-item resample counts without materialising resamples:

- :class:`CorpusBleu` (``order`` 1-4): coco-caption's corpus BLEU from per-item :data:`BLEU_STAT_FIELDS`;
- :class:`CorpusMeteor`: METEOR 1.5's corpus score (the jar's ``EVAL``) from per-segment
  :data:`METEOR_STAT_FIELDS`, with :class:`MeteorParameters` (the jar's English defaults);
- :class:`MeanAveragePrecision` (optionally a subset of ``classes``): the mAP over clips of
  ``avlm.metrics.classification``, on :func:`clip_items` (N, 2, K), recomputed per resample.

:class:`CorpusBleu` and :class:`CorpusMeteor` are :class:`PooledStatistic` s (a formula on summed per-item
statistics); on the full sample (``.value(items)``) they equal the scorers' corpus values.
``avlm.metrics.caption_statistics.caption_item_statistics`` collects their per-item statistics from the scorers.
And :func:`best_f1`, the best-threshold F1 of multi-label scores.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterable

import numpy as np
import scipy.stats
from scipy.special import ndtr, ndtri
from sklearn.metrics import precision_recall_curve

PAIRED_TESTS: tuple[str, ...] = ("ttest", "wilcoxon", "permutation")
ALTERNATIVES: tuple[str, ...] = ("two-sided", "greater", "less")
CI_METHODS: tuple[str, ...] = ("percentile", "bca")
# The sign-flip permutation test enumerates all 2**n flips up to this many pairs (4,096 flips), Monte Carlo above.
EXACT_PERMUTATION_MAX_PAIRS = 12
# Wilcoxon's zero handling: "wilcox" drops zero differences (scipy's default), so a tie between the two systems on a
# seed counts as no evidence either way; the remaining differences are ranked.
WILCOXON_ZERO_METHOD = "wilcox"
# Resamples are drawn (and the statistic evaluated) in chunks of about this many item slots, so 10,000 resamples of
# 1,000 items is one draw (identical to scipy.stats.bootstrap's for the same seed) and larger inputs stay in memory.
_RESAMPLE_CHUNK_ELEMENTS = 1 << 24


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of ``values`` (e.g. one metric over seeds).

    The std is the sample std (``ddof=1``, Bessel-corrected): with a handful of seeds it is the unbiased variance
    estimate, and it is larger than numpy's default ``ddof=0`` by a factor ``sqrt(n / (n - 1))`` (1.22 for
    three seeds). One value has no spread to estimate: its std is reported as 0.

    Args:
        values: one or more numbers; NaN propagates to both results.

    Returns:
        ``(mean, std)`` as Python floats.

    Raises:
        ValueError: ``values`` is empty.
    """
    array = np.asarray(list(values), dtype=np.float64).ravel()
    if array.size == 0:
        raise ValueError("mean_std needs at least one value")
    std = float(np.std(array, ddof=1)) if array.size > 1 else 0.0
    return float(np.mean(array)), std


def format_mean_std(mean: float, std: float, digits: int = 4) -> str:
    """``mean ± std`` with ``digits`` decimals each, as in the probe report: ``"0.6015 ± 0.0465"``."""
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def best_f1(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Mean over classes of each class's best F1 over all decision thresholds.

    For each class (column) that has a positive, sklearn's ``precision_recall_curve`` gives precision and recall at
    every distinct score used as a threshold (predict positive when ``score >= threshold``); the class's best F1
    is the largest ``2PR / (P + R)`` over those points (0 where ``P + R = 0``). The result is the unweighted mean
    over those classes, like ``mean_average_precision``.

    The threshold is chosen per class on the very data it is scored on, so this is an optimistic (oracle-threshold)
    figure, and it has a floor that needs no model: the lowest threshold predicts every sample positive, which
    scores ``2p / (1 + p)`` for a class of prevalence ``p``.

    Args:
        y_true: (N, K) targets in [0, 1], binarised at 0.5 like ``average_precision_per_class``; 1-D is one class.
        scores: (N, K) scores on any monotone scale.

    Returns:
        The mean best F1; NaN when no class has a positive.

    Raises:
        ValueError: the shapes differ or are not 1-D / 2-D.
    """
    targets = np.asarray(y_true, dtype=np.float64)
    preds = np.asarray(scores, dtype=np.float64)
    if targets.shape != preds.shape:
        raise ValueError(f"y_true {targets.shape} and scores {preds.shape} must have the same shape")
    if targets.ndim == 1:
        targets, preds = targets[:, None], preds[:, None]
    if targets.ndim != 2:
        raise ValueError(f"y_true and scores must be (N, K), got shape {targets.shape}")
    positives = targets >= 0.5
    per_class = []
    for k in range(targets.shape[1]):
        # F1 is undefined without a positive (and sklearn warns): skip the class, as mAP does.
        if not positives[:, k].any():
            continue
        precision, recall, _ = precision_recall_curve(positives[:, k], preds[:, k])
        denominator = precision + recall
        f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
        per_class.append(f1.max())
    return float(np.mean(per_class)) if per_class else float("nan")


@dataclasses.dataclass(frozen=True)
class PairedTestResult:
    """Outcome of :func:`paired_test`.

    Attributes:
        test: one of :data:`PAIRED_TESTS`.
        alternative: ``"two-sided"``, ``"greater"`` (candidate > baseline) or ``"less"``.
        statistic: the test's statistic: t for ``ttest``, the Wilcoxon rank sum (scipy's convention: the smaller of
            the two rank sums when two-sided, else the sum of ranks of positive differences) for ``wilcoxon``, the
            mean difference for ``permutation``; 0 when every difference is zero.
        p_value: the p-value under ``alternative``; 1.0 when every difference is zero.
        n: number of pairs.
        mean_delta: ``mean(candidate - baseline)``.
        exact: ``permutation`` only: True when all ``2**n`` sign flips were enumerated (``n <= 12``).
    """

    test: str
    alternative: str
    statistic: float
    p_value: float
    n: int
    mean_delta: float
    exact: bool


@dataclasses.dataclass(frozen=True)
class ConfidenceInterval:
    """A bootstrap confidence interval of a statistic (:func:`bootstrap_ci`, :func:`paired_bootstrap`).

    Attributes:
        estimate: the statistic on the full sample.
        low: lower bound.
        high: upper bound.
        confidence: coverage, e.g. 0.95.
        method: ``"percentile"`` or ``"bca"``.
        n_resamples: number of bootstrap resamples.
        seed: seed of the resampling generator (``numpy.random.default_rng(seed)``).
    """

    estimate: float
    low: float
    high: float
    confidence: float
    method: str
    n_resamples: int
    seed: int


@dataclasses.dataclass(frozen=True)
class PairedBootstrapResult:
    """Outcome of :func:`paired_bootstrap`.

    Attributes:
        delta: interval of ``statistic(candidate) - statistic(baseline)``, items resampled jointly.
        p_value: two-sided bootstrap p-value of H0 ``delta = 0``: ``min(1, 2 min(k_le + 1, k_ge + 1) / (B + 1))``
            with ``k_le`` / ``k_ge`` the resampled deltas ``<= 0`` / ``>= 0`` out of ``B`` (1 for identical systems).
    """

    delta: ConfidenceInterval
    p_value: float


def _as_vector(values: Iterable[float], what: str) -> np.ndarray:
    array = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{what} must be a 1-D sequence of numbers, got shape {array.shape}")
    if np.isnan(array).any():
        raise ValueError(f"{what} holds NaN: {array.tolist()}")
    return array


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(choices)}")


def _mean_difference(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x - y, axis=axis)


def paired_test(
    candidate: Iterable[float],
    baseline: Iterable[float],
    test: str = "wilcoxon",
    alternative: str = "two-sided",
    *,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> PairedTestResult:
    """Paired test of ``candidate`` against ``baseline`` (e.g. one metric per seed, paired by seed).

    - ``ttest``: ``scipy.stats.ttest_rel`` (t on the differences).
    - ``wilcoxon``: ``scipy.stats.wilcoxon`` signed-rank on the differences, ``zero_method="wilcox"`` (zero
      differences are dropped), ``method="auto"`` (exact null distribution up to 50 pairs without ties or zeros,
      exhaustive permutations up to 13 with them, normal approximation above).
    - ``permutation``: paired sign-flip test of the mean difference, ``scipy.stats.permutation_test`` with
      ``permutation_type="samples"`` (swapping a pair's two values flips its difference's sign): exact over all
      ``2**n`` flips for ``n <= 12``, else ``n_resamples`` random flips from ``default_rng(seed)`` (scipy counts the
      observed statistic among them, so the p-value is never 0).

    When every difference is zero there is no evidence either way: p = 1.0 and statistic 0 (scipy would give NaN).

    Args:
        candidate: the candidate's values.
        baseline: the baseline's values, in the same order (pair i is ``candidate[i]``, ``baseline[i]``).
        test: one of :data:`PAIRED_TESTS`.
        alternative: ``"two-sided"``, ``"greater"`` (candidate > baseline) or ``"less"``.
        n_resamples: Monte Carlo sign flips of the permutation test above 12 pairs.
        seed: seed of those flips.

    Returns:
        The :class:`PairedTestResult`.

    Raises:
        ValueError: the lengths differ, fewer than 2 pairs, a value is NaN, or an unknown test or alternative.
    """
    _check_choice(test, PAIRED_TESTS, "paired test")
    _check_choice(alternative, ALTERNATIVES, "alternative")
    cand = _as_vector(candidate, "candidate")
    base = _as_vector(baseline, "baseline")
    if cand.shape != base.shape:
        raise ValueError(f"candidate ({cand.size} values) and baseline ({base.size} values) must pair one to one")
    n = int(cand.size)
    if n < 2:
        raise ValueError(f"a paired test needs at least 2 pairs, got {n}")
    deltas = cand - base
    mean_delta = float(np.mean(deltas))
    exact = test == "permutation" and n <= EXACT_PERMUTATION_MAX_PAIRS
    if not np.any(deltas != 0):
        return PairedTestResult(test, alternative, 0.0, 1.0, n, mean_delta, exact)
    if test == "ttest":
        result = scipy.stats.ttest_rel(cand, base, alternative=alternative)
    elif test == "wilcoxon":
        result = scipy.stats.wilcoxon(cand, base, zero_method=WILCOXON_ZERO_METHOD, alternative=alternative)
    else:
        result = scipy.stats.permutation_test(
            (cand, base),
            _mean_difference,
            permutation_type="samples",
            vectorized=True,
            n_resamples=np.inf if exact else n_resamples,
            alternative=alternative,
            rng=np.random.default_rng(seed),
        )
    return PairedTestResult(test, alternative, float(result.statistic), float(result.pvalue), n, mean_delta, exact)


class WeightedStatistic(abc.ABC):
    """A statistic of items that can be evaluated from per-item weights (bootstrap resample counts).

    :func:`bootstrap_ci` and :func:`paired_bootstrap` call :meth:`weighted` with the resample counts instead of
    materialising each resample, which is what makes corpus metrics (BLEU, METEOR, mAP) cheap to bootstrap. Calling
    the object on a batch of resampled items (the plain ``statistic`` contract) gives the same values.
    """

    @abc.abstractmethod
    def weighted(self, items: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Statistic of ``items`` (n, ...) under each row of ``weights`` (b, n) of item counts; returns (b,)."""

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Statistic of each resample in ``batch`` (b, n, ...); returns (b,)."""
        batch = np.asarray(batch, dtype=np.float64)
        ones = np.ones((1, batch.shape[1]))
        return np.concatenate([self.weighted(resample, ones) for resample in batch])

    def value(self, items: np.ndarray) -> float:
        """The statistic of all ``items``, each counted once (the scorer's value on the full sample)."""
        items = np.asarray(items, dtype=np.float64)
        return float(self.weighted(items, np.ones((1, items.shape[0])))[0])


class _Evaluator(abc.ABC):
    """A statistic bound to its items: on the full sample, on resamples (index rows) and leave-one-out."""

    n: int

    @abc.abstractmethod
    def full(self) -> float: ...

    @abc.abstractmethod
    def resampled(self, indices: np.ndarray) -> np.ndarray: ...

    @abc.abstractmethod
    def jackknife(self) -> np.ndarray: ...


class _MeanEvaluator(_Evaluator):
    # The item-mean fast path: one gather and one mean per chunk, as a plain numpy bootstrap would do.
    def __init__(self, values: np.ndarray):
        self.values, self.n = values, values.shape[0]

    def full(self) -> float:
        return float(np.mean(self.values))

    def resampled(self, indices: np.ndarray) -> np.ndarray:
        return self.values[indices].mean(axis=1)

    def jackknife(self) -> np.ndarray:
        return (self.values.sum() - self.values) / (self.n - 1)


def _leave_one_out_indices(n: int, rows: slice) -> np.ndarray:
    # Row i lists every item but i: 0..n-2 shifted up by one from position i on.
    keep = np.arange(n - 1)
    return keep[None, :] + (keep[None, :] >= np.arange(n)[rows, None])


def _chunks(total: int, per_chunk: int) -> Iterable[slice]:
    for start in range(0, total, per_chunk):
        yield slice(start, min(start + per_chunk, total))


class _CallableEvaluator(_Evaluator):
    def __init__(self, items: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray]):
        self.items, self.statistic, self.n = items, statistic, items.shape[0]
        self.rows_per_call = max(1, _RESAMPLE_CHUNK_ELEMENTS // max(1, items.size))

    def _evaluate(self, indices: np.ndarray) -> np.ndarray:
        values = [self.statistic(self.items[indices[rows]]) for rows in _chunks(len(indices), self.rows_per_call)]
        return np.concatenate([np.asarray(v, dtype=np.float64).reshape(-1) for v in values])

    def full(self) -> float:
        return float(self._evaluate(np.arange(self.n)[None, :])[0])

    def resampled(self, indices: np.ndarray) -> np.ndarray:
        return self._evaluate(indices)

    def jackknife(self) -> np.ndarray:
        return np.concatenate(
            [self._evaluate(_leave_one_out_indices(self.n, rows)) for rows in _chunks(self.n, self.rows_per_call)]
        )


class _WeightedEvaluator(_Evaluator):
    def __init__(self, items: np.ndarray, statistic: WeightedStatistic):
        self.items, self.statistic, self.n = items, statistic, items.shape[0]
        self.rows_per_call = max(1, _RESAMPLE_CHUNK_ELEMENTS // max(1, self.n))

    def _weighted(self, weights: np.ndarray) -> np.ndarray:
        return np.asarray(self.statistic.weighted(self.items, weights), dtype=np.float64).reshape(-1)

    def full(self) -> float:
        return float(self._weighted(np.ones((1, self.n)))[0])

    def resampled(self, indices: np.ndarray) -> np.ndarray:
        rows = indices.shape[0]
        # Counts of each item in each resample, by one bincount over row-offset indices.
        offsets = (indices + (np.arange(rows) * self.n)[:, None]).ravel()
        counts = np.bincount(offsets, minlength=rows * self.n).reshape(rows, self.n).astype(np.float64)
        return self._weighted(counts)

    def jackknife(self) -> np.ndarray:
        values = []
        for rows in _chunks(self.n, self.rows_per_call):
            weights = np.ones((rows.stop - rows.start, self.n))
            weights[np.arange(rows.stop - rows.start), np.arange(rows.start, rows.stop)] = 0.0
            values.append(self._weighted(weights))
        return np.concatenate(values)


class _DifferenceEvaluator(_Evaluator):
    def __init__(self, candidate: _Evaluator, baseline: _Evaluator):
        self.candidate, self.baseline, self.n = candidate, baseline, candidate.n

    def full(self) -> float:
        return self.candidate.full() - self.baseline.full()

    def resampled(self, indices: np.ndarray) -> np.ndarray:
        return self.candidate.resampled(indices) - self.baseline.resampled(indices)

    def jackknife(self) -> np.ndarray:
        return self.candidate.jackknife() - self.baseline.jackknife()


def _evaluator(items: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray] | None, what: str) -> _Evaluator:
    array = np.asarray(items, dtype=np.float64)
    if array.ndim == 0 or array.shape[0] == 0:
        raise ValueError(f"{what} must hold at least one item, got shape {array.shape}")
    if statistic is None:
        if array.ndim != 1:
            raise ValueError(f"{what} must be 1-D per-item scores when statistic is None, got shape {array.shape}")
        return _MeanEvaluator(array)
    if isinstance(statistic, WeightedStatistic):
        return _WeightedEvaluator(array, statistic)
    return _CallableEvaluator(array, statistic)


def _bootstrap_distribution(evaluator: _Evaluator, n_resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = evaluator.n
    rows_per_draw = max(1, _RESAMPLE_CHUNK_ELEMENTS // n)
    # Same draws as scipy.stats.bootstrap (rng.integers(0, n, (B, n))) whenever one chunk holds all resamples.
    draws = (rng.integers(0, n, (rows.stop - rows.start, n)) for rows in _chunks(n_resamples, rows_per_draw))
    return np.concatenate([evaluator.resampled(indices) for indices in draws])


def _interval(
    evaluator: _Evaluator, distribution: np.ndarray, estimate: float, method: str, confidence: float
) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    if np.ptp(distribution) == 0:
        # Every resample gives the same value (e.g. identical systems): the interval is that point; BCa is 0/0.
        return float(distribution[0]), float(distribution[0])
    if method == "percentile":
        levels = np.array([alpha, 1.0 - alpha])
    else:
        # BCa as scipy.stats.bootstrap (Efron & Tibshirani 14.3, 15.4): bias from the share of resamples below the
        # estimate, acceleration from the jackknife's skewness.
        count = len(distribution)
        share = (np.count_nonzero(distribution < estimate) + np.count_nonzero(distribution <= estimate)) / (2 * count)
        # An estimate outside the whole distribution would make z0 infinite; clip to half a resample from the edge.
        z0 = ndtri(np.clip(share, 0.5 / count, 1.0 - 0.5 / count))
        leave_one_out = evaluator.jackknife()
        spread = leave_one_out.mean() - leave_one_out
        denominator = np.sum(spread**2) ** 1.5
        accel = np.sum(spread**3) / (6.0 * denominator) if denominator > 0 else 0.0
        z = ndtri(np.array([alpha, 1.0 - alpha]))
        levels = ndtr(z0 + (z0 + z) / (1.0 - accel * (z0 + z)))
    low, high = np.percentile(distribution, 100.0 * levels)
    return float(low), float(high)


def _bootstrap(
    evaluator: _Evaluator, method: str, confidence: float, n_resamples: int, seed: int
) -> tuple[ConfidenceInterval, np.ndarray]:
    """Validate the arguments, resample, and return the interval with the bootstrap distribution."""
    _check_choice(method, CI_METHODS, "bootstrap method")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples}")
    if method == "bca" and evaluator.n < 2:
        raise ValueError(f"BCa needs at least 2 items for its jackknife, got {evaluator.n}")
    estimate = evaluator.full()
    distribution = _bootstrap_distribution(evaluator, int(n_resamples), seed)
    low, high = _interval(evaluator, distribution, estimate, method, confidence)
    return ConfidenceInterval(estimate, low, high, confidence, method, int(n_resamples), seed), distribution


def bootstrap_ci(
    items: np.ndarray | Iterable[float],
    statistic: Callable[[np.ndarray], np.ndarray] | None = None,
    *,
    method: str = "bca",
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> ConfidenceInterval:
    """Bootstrap confidence interval of a statistic of items, resampling items with replacement.

    Resample ``b`` is ``items[idx[b]]`` with ``idx = default_rng(seed).integers(0, n, (n_resamples, n))`` (drawn
    in chunks of about 2**24 item slots), the same draws as ``scipy.stats.bootstrap`` when one chunk holds them all;
    the percentile interval and the BCa interval (scipy's formulas: bias ``z0`` from the "mean" percentile of the
    estimate among resamples, acceleration from the jackknife) are read from the resampled values with
    ``np.percentile``'s linear interpolation. When every resample gives the same value the interval is that point.

    Args:
        items: (n,) per-item scores when ``statistic`` is None (the statistic is then their mean, the fast path);
            else (n, ...) per-item sufficient statistics.
        statistic: maps a batch of resampled items (b, n, ...) to (b,) values, e.g. a corpus metric from summed
            per-item statistics; a :class:`WeightedStatistic` is evaluated from resample counts instead.
        method: ``"bca"`` or ``"percentile"``.
        confidence: coverage of the two-sided interval.
        n_resamples: number of resamples.
        seed: seed of the resampling generator.

    Returns:
        The :class:`ConfidenceInterval`; ``estimate`` is the statistic on all items.

    Raises:
        ValueError: no items, ``items`` not 1-D with ``statistic`` None, an unknown method, ``confidence`` outside
            (0, 1), ``n_resamples < 1``, or BCa on one item.
    """
    evaluator = _evaluator(np.asarray(items, dtype=np.float64), statistic, "items")
    return _bootstrap(evaluator, method, confidence, n_resamples, seed)[0]


def paired_bootstrap(
    candidate_items: np.ndarray | Iterable[float],
    baseline_items: np.ndarray | Iterable[float],
    statistic: Callable[[np.ndarray], np.ndarray] | None = None,
    *,
    method: str = "percentile",
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> PairedBootstrapResult:
    """Paired bootstrap of ``statistic(candidate) - statistic(baseline)`` over items both systems were scored on.

    Each resample draws one set of item indices and applies it to both systems (as :func:`bootstrap_ci` draws
    them), so item difficulty cancels out of the difference. The p-value is the two-sided percentile-bootstrap
    p-value of H0 ``delta = 0``: twice the smaller share of resampled deltas on either side of zero, with the
    +1 correction of Davison & Hinkley (eq. 4.11) so that it is never 0, capped at 1. It is 1 for identical
    systems, and below ``1 - confidence`` about when the percentile interval excludes 0.

    Args:
        candidate_items: the candidate's per-item scores (n,), or per-item sufficient statistics (n, ...).
        baseline_items: the baseline's, same shape, same items in the same order.
        statistic: as in :func:`bootstrap_ci` (None = mean of per-item scores).
        method: ``"percentile"`` or ``"bca"`` for the interval of the difference.
        confidence: coverage of the interval.
        n_resamples: number of resamples.
        seed: seed of the resampling generator.

    Returns:
        The :class:`PairedBootstrapResult`.

    Raises:
        ValueError: the shapes differ, or as :func:`bootstrap_ci`.
    """
    candidate = np.asarray(candidate_items, dtype=np.float64)
    baseline = np.asarray(baseline_items, dtype=np.float64)
    if candidate.shape != baseline.shape:
        raise ValueError(f"candidate items {candidate.shape} and baseline items {baseline.shape} must have one shape")
    evaluator = _DifferenceEvaluator(
        _evaluator(candidate, statistic, "candidate_items"), _evaluator(baseline, statistic, "baseline_items")
    )
    delta, distribution = _bootstrap(evaluator, method, confidence, n_resamples, seed)
    below, above = np.count_nonzero(distribution <= 0), np.count_nonzero(distribution >= 0)
    p_value = min(1.0, 2.0 * (min(below, above) + 1) / (len(distribution) + 1))
    return PairedBootstrapResult(delta, float(p_value))


class PooledStatistic(WeightedStatistic):
    """A corpus statistic computed from the sums of per-item sufficient statistics (BLEU, METEOR).

    Items are (n, k) per-item statistics; a resample's totals are ``weights @ items``, so a bootstrap costs one
    matrix product plus the formula on (b, k) totals.
    """

    @abc.abstractmethod
    def from_totals(self, totals: np.ndarray) -> np.ndarray:
        """The statistic of each row of ``totals`` (b, k) of summed per-item statistics; returns (b,)."""

    def weighted(self, items: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Statistic of ``items`` (n, k) under each row of ``weights`` (b, n); returns (b,)."""
        return self.from_totals(np.asarray(weights, dtype=np.float64) @ np.asarray(items, dtype=np.float64))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Statistic of each resample in ``batch`` (b, n, k); returns (b,)."""
        return self.from_totals(np.asarray(batch, dtype=np.float64).sum(axis=1))

    def value(self, items: np.ndarray) -> float:
        """The statistic of all ``items`` (n, k), each counted once: the scorer's corpus value."""
        return float(self.from_totals(np.asarray(items, dtype=np.float64).sum(axis=0)[None, :])[0])


# Columns of the per-item BLEU statistics (avlm.metrics.caption_statistics.bleu_item_statistics): hypothesis length,
# the "closest" reference length, candidate n-grams of order 1..4, and their clipped matches.
BLEU_STAT_FIELDS: tuple[str, ...] = (
    "testlen",
    "reflen",
    *(f"guess_{k}" for k in range(1, 5)),
    *(f"correct_{k}" for k in range(1, 5)),
)
# pycocoevalcap's BleuScorer guards its ratios with these (a hypothesis without a match scores ~0, not 0/0).
_BLEU_TINY = 1e-15
_BLEU_SMALL = 1e-9


class CorpusBleu(PooledStatistic):
    """Corpus BLEU-``order`` of coco-caption (pycocoevalcap's ``Bleu``) from per-item statistics.

    pycocoevalcap pools over the corpus: with ``c_k`` / ``g_k`` the summed clipped matches / candidate n-grams of
    order k, ``T`` the summed hypothesis lengths and ``R`` the summed per-item closest reference lengths (ties to
    the shorter), ``BLEU_N = (prod_{k<=N} (c_k + 1e-15) / (g_k + 1e-9)) ** (1/N)``, times the brevity penalty
    ``exp(1 - 1/r)`` when ``r = (T + 1e-15) / (R + 1e-9) < 1``. The operations run in pycocoevalcap's order, so
    the full-sample value is its corpus score.

    Args:
        order: the largest n-gram order N, 1 to 4.
    """

    def __init__(self, order: int = 4):
        if order not in (1, 2, 3, 4):
            raise ValueError(f"BLEU order must be 1, 2, 3 or 4, got {order}")
        self.order = order

    def from_totals(self, totals: np.ndarray) -> np.ndarray:
        """BLEU-``order`` of each row of ``totals`` (b, 10), columns :data:`BLEU_STAT_FIELDS`."""
        totals = np.asarray(totals, dtype=np.float64)
        product = np.ones(totals.shape[0])
        for k in range(self.order):
            product = product * ((totals[:, 6 + k] + _BLEU_TINY) / (totals[:, 2 + k] + _BLEU_SMALL))
        bleu = product ** (1.0 / self.order)
        ratio = (totals[:, 0] + _BLEU_TINY) / (totals[:, 1] + _BLEU_SMALL)
        penalty = np.exp(1.0 - 1.0 / np.where(ratio < 1.0, ratio, 1.0))
        return np.where(ratio < 1.0, bleu * penalty, bleu)


# Columns of METEOR 1.5's per-segment statistics line (the jar's answer to ``SCORE``), in the jar's order.
METEOR_MODULES: tuple[str, ...] = ("exact", "stem", "synonym", "paraphrase")
METEOR_STAT_FIELDS: tuple[str, ...] = (
    "test_length",
    "reference_length",
    "test_function_words",
    "reference_function_words",
    *(
        f"{side}_{module}_{kind}"
        for module in METEOR_MODULES
        for kind in ("content", "function")
        for side in ("test", "reference")
    ),
    "chunks",
    "test_word_matches",
    "reference_word_matches",
)


@dataclasses.dataclass(frozen=True)
class MeteorParameters:
    """METEOR 1.5's scoring parameters; the defaults are the jar's for ``-l en`` and the default (ranking) task.

    The jar prints them as ``Parameters: 0.85 0.2 0.6 0.75`` and ``Weights: 1.0 0.6 0.8 0.6`` (eval id
    ``meteor-1.5-wo-en-norm-0.85_0.2_0.6_0.75-ex_st_sy_pa-1.0_0.6_0.8_0.6``).

    Attributes:
        alpha: weight of recall in the harmonic F-mean.
        beta: exponent of the fragmentation penalty.
        gamma: largest fragmentation penalty.
        delta: weight of content words against function words.
        module_weights: weight of matches of each module of :data:`METEOR_MODULES`.
    """

    alpha: float = 0.85
    beta: float = 0.2
    gamma: float = 0.6
    delta: float = 0.75
    module_weights: tuple[float, ...] = (1.0, 0.6, 0.8, 0.6)


class CorpusMeteor(PooledStatistic):
    """Corpus METEOR 1.5 (the jar's ``EVAL`` over all segments) from per-segment statistics.

    The jar adds the segments' statistics and applies its formula (``MeteorScorer.computeMetrics``) to the sums:
    weighted precision P and recall R (matches of each module times its weight, content words weighted ``delta``
    and function words ``1 - delta``, over lengths weighted the same way), ``Fmean = 1 / ((1 - alpha) / P +
    alpha / R)``, fragmentation ``chunks / ((test_word_matches + reference_word_matches) / 2)`` (0 for a perfect
    single-chunk match), penalty ``gamma * frag ** beta``, score ``max(0, Fmean * (1 - penalty))`` and 0 for 0/0.
    This reproduces the jar's corpus value (pycocoevalcap's ``Meteor`` score) to rounding.

    Args:
        parameters: the jar's parameters (defaults: English, default task).
    """

    def __init__(self, parameters: MeteorParameters | None = None):
        self.parameters = parameters or MeteorParameters()

    def from_totals(self, totals: np.ndarray) -> np.ndarray:
        """METEOR of each row of ``totals`` (b, 23), columns :data:`METEOR_STAT_FIELDS`."""
        totals = np.asarray(totals, dtype=np.float64)
        p = self.parameters
        test_length, reference_length, test_function, reference_function = totals[:, :4].T
        stages = totals[:, 4:20].reshape(-1, 4, 4)  # (b, module, [test content, ref content, test fn, ref fn])
        chunks, test_words, reference_words = totals[:, 20], totals[:, 21], totals[:, 22]
        with np.errstate(divide="ignore", invalid="ignore"):
            test_weighted_length = p.delta * (test_length - test_function) + (1.0 - p.delta) * test_function
            reference_weighted_length = (
                p.delta * (reference_length - reference_function) + (1.0 - p.delta) * reference_function
            )
            # Summed in the jar's order: content matches over modules, then function matches.
            test_matches = np.zeros(totals.shape[0])
            reference_matches = np.zeros(totals.shape[0])
            for i, weight in enumerate(p.module_weights):
                test_matches = test_matches + stages[:, i, 0] * weight * p.delta
            for i, weight in enumerate(p.module_weights):
                reference_matches = reference_matches + stages[:, i, 1] * weight * p.delta
            for i, weight in enumerate(p.module_weights):
                test_matches = test_matches + stages[:, i, 2] * weight * (1.0 - p.delta)
            for i, weight in enumerate(p.module_weights):
                reference_matches = reference_matches + stages[:, i, 3] * weight * (1.0 - p.delta)
            precision = test_matches / test_weighted_length
            recall = reference_matches / reference_weighted_length
            f_mean = 1.0 / ((1.0 - p.alpha) / precision + p.alpha / recall)
            test_total = stages[:, :, 0].sum(axis=1) + stages[:, :, 2].sum(axis=1)
            reference_total = stages[:, :, 1].sum(axis=1) + stages[:, :, 3].sum(axis=1)
            perfect = (test_total == test_length) & (reference_total == reference_length) & (chunks == 1)
            fragmentation = np.where(perfect, 0.0, chunks / ((test_words + reference_words) / 2.0))
            score = f_mean * (1.0 - p.gamma * fragmentation**p.beta)
        return np.where(np.isnan(score), 0.0, np.maximum(score, 0.0))


def clip_items(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Stack per-clip targets and scores (N, K) into the (N, 2, K) items :class:`MeanAveragePrecision` resamples.

    Raises:
        ValueError: the shapes differ or are not (N, K) / (N,).
    """
    targets = np.asarray(y_true, dtype=np.float64)
    preds = np.asarray(scores, dtype=np.float64)
    if targets.shape != preds.shape:
        raise ValueError(f"y_true {targets.shape} and scores {preds.shape} must have the same shape")
    if targets.ndim == 1:
        targets, preds = targets[:, None], preds[:, None]
    if targets.ndim != 2:
        raise ValueError(f"y_true and scores must be (N, K), got shape {targets.shape}")
    return np.stack([targets, preds], axis=1)


class MeanAveragePrecision(WeightedStatistic):
    """mAP over clips as ``avlm.metrics.classification.mean_average_precision``, recomputed for each resample.

    Items are :func:`clip_items` (N, 2, K). Each class's AP is sklearn's (``sum_t (R_t - R_{t-1}) P_t`` over the
    distinct scores t, targets binarised at 0.5) with each clip counted as often as the resample draws it; the
    mean is over the classes with a positive in the resample (NaN when none has). Sorting each class once and
    taking weighted cumulative sums gives every resample's AP without re-sorting.

    Args:
        classes: indices of the classes to average over (e.g. ``[k]`` for the AP of class k); None = all.
    """

    def __init__(self, classes: Iterable[int] | None = None):
        self.classes = None if classes is None else [int(k) for k in classes]

    def weighted(self, items: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """mAP of ``items`` (N, 2, K) under each row of ``weights`` (b, N); returns (b,)."""
        items = np.asarray(items, dtype=np.float64)
        weights = np.asarray(weights, dtype=np.float64)
        if items.ndim != 3 or items.shape[1] != 2:
            raise ValueError(f"mAP items must be (N, 2, K) from clip_items, got shape {items.shape}")
        classes = range(items.shape[2]) if self.classes is None else self.classes
        ap_sum = np.zeros(weights.shape[0])
        defined = np.zeros(weights.shape[0])
        for k in classes:
            positive = items[:, 0, k] >= 0.5
            order = np.argsort(-items[:, 1, k], kind="stable")
            sorted_scores = items[order, 1, k]
            # The last clip of each run of equal scores closes one threshold.
            closes = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
            sorted_weights = weights[:, order]
            true_positives = np.cumsum(sorted_weights * positive[order], axis=1)[:, closes]
            predicted = np.cumsum(sorted_weights, axis=1)[:, closes]
            n_positive = true_positives[:, -1]
            with np.errstate(divide="ignore", invalid="ignore"):
                precision = np.where(predicted > 0, true_positives / predicted, 0.0)
                recall_step = np.diff(true_positives, axis=1, prepend=0.0) / n_positive[:, None]
                ap = np.sum(recall_step * precision, axis=1)
            has_positive = n_positive > 0
            ap_sum += np.where(has_positive, ap, 0.0)
            defined += has_positive
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(defined > 0, ap_sum / defined, np.nan)
