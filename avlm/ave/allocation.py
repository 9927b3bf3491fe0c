"""Stage 2's token allocation: which resolution each second of a clip is seen at, under one budget per clip.

A resolution ``r`` costs ``tokens[r]`` visual tokens (``(r // patch) ** 2``, from the feature cache). Every clip gets
the budget of the uniform plan, ``10 × tokens[base_resolution]``, and every plan spends exactly that:

- ``uniform``: every second at ``base_resolution``.
- ``anchored``: the top-``k`` seconds by eventness score (greedy, ties → the earlier second, moved ``shift`` seconds
  later and at least ``min_gap`` apart) are *anchors*: the first ``max_high_anchors`` of them at
  ``high_resolution``, the others at ``mid_resolution``; the ``adjacent`` seconds on each side of an anchor are kept
  at ``mid_resolution`` too (0 = the base). The remaining seconds pay for them: among the mixes of
  ``{base} ∪ low_resolutions`` over those seconds whose total is exactly the budget, the one keeping the most seconds
  at base, then the most at the next resolution down, and so on; the lowest-scored seconds get the lowest
  resolutions. A confidence gate falls back to uniform when the scores are too flat to trust
  (``flat_scores (std 0.012 < 0.2)``), and so does a clip whose arrangement has no exact mix (an anchor's
  neighbours clipped at the clip's edge or shared by two anchors change the count): ``budget_infeasible``. The
  fallback is recorded per clip, never silent.

:func:`check_allocation` refuses, before any run, a config whose resolutions are not cached or whose canonical
arrangement (``k`` anchors with all their neighbours, none shared) has no exact mix.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np

from avlm.errors import AvlmError, ConfigError, DataError

# The length of an AVE clip in seconds (avlm.data.ave.SECONDS; not imported: that module brings in the readers).
SECONDS = 10
GATE_KINDS = ("none", "std", "top1_median", "gini")
METHODS = ("uniform", "anchored")
BUDGET_INFEASIBLE = "budget_infeasible"
FLAT_SCORES = "flat_scores"


@dataclasses.dataclass
class ConfidenceGate:
    """When a clip's eventness scores are too flat to trust: the plan falls back to uniform.

    Attributes:
        kind: the confidence figure (:func:`confidence`): ``none`` (never fall back), ``std`` (standard deviation
            of the 10 scores), ``top1_median`` (the top score minus the median), ``gini`` (Gini coefficient of the
            scores minus their minimum: 0 = flat, 0.9 = one second holds everything).
        threshold: fall back when the confidence is below it (``std`` and ``top1_median`` are in the scores'
            units: normalise the scores in ``eventness.normalize`` for a threshold that transfers across scorers).
    """

    kind: Literal["none", "std", "top1_median", "gini"] = "none"
    threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in GATE_KINDS:
            raise ConfigError(
                f"config key 'allocation.gate.kind' must be one of {', '.join(GATE_KINDS)}, got {self.kind!r}"
            )
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and self.threshold >= 0):
            raise ConfigError(
                f"config key 'allocation.gate.threshold' must be a finite number >= 0, got {self.threshold!r}"
            )


@dataclasses.dataclass
class AllocationConfig:
    """How a clip's visual token budget is spent (config section ``allocation``); see the module docstring.

    Attributes:
        method: ``uniform`` or ``anchored``.
        base_resolution: the uniform plan's resolution; the budget is ``10 × tokens(base_resolution)``.
        high_resolution: the resolution of the first ``max_high_anchors`` anchors.
        mid_resolution: the other anchors' and the anchors' neighbours' resolution; 0 = ``base_resolution``.
        low_resolutions: what the remaining seconds may drop to so that the total equals the budget (each below
            the base).
        k: the number of anchors: the top-k seconds by score (fewer when ``min_gap`` leaves no room beside the
            first picks, e.g. k=2, min_gap=6 and a first anchor at second 5).
        min_gap: anchors (after the shift) at least this many seconds apart; 1 = any two distinct seconds.
        adjacent: seconds on each side of an anchor kept at ``mid_resolution`` (the log's ``adj`` / ``keepadj``).
        shift: anchors moved this many seconds later (negative: earlier), clamped to the clip (the log's ``shift``).
        max_high_anchors: at most this many anchors at ``high_resolution`` (the best-scored ones); the rest at mid.
        gate: when to fall back to uniform (:class:`ConfidenceGate`).
    """

    method: Literal["uniform", "anchored"] = "uniform"
    base_resolution: int = 112
    high_resolution: int = 176
    mid_resolution: int = 0
    low_resolutions: list[int] = dataclasses.field(default_factory=lambda: [80])
    k: int = 2
    min_gap: int = 1
    adjacent: int = 0
    shift: int = 0
    max_high_anchors: int = 2
    gate: ConfidenceGate = dataclasses.field(default_factory=ConfidenceGate)

    def __post_init__(self) -> None:
        def refuse(key: str, message: str) -> None:
            raise ConfigError(f"config key 'allocation.{key}': {message}")

        if self.method not in METHODS:
            refuse("method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        for key in ("base_resolution", "high_resolution"):
            if getattr(self, key) <= 0:
                refuse(key, f"must be > 0, got {getattr(self, key)}")
        # uniform spends base_resolution alone: how the others relate to it matters to anchored plans only (a sweep
        # over uniform budgets keeps one anchored section for its anchored cells)
        if self.method == "anchored" and self.high_resolution <= self.base_resolution:
            refuse("high_resolution", f"{self.high_resolution} must be above base_resolution {self.base_resolution}")
        if self.mid_resolution and not 0 < self.mid_resolution < self.high_resolution:
            refuse(
                "mid_resolution", f"must be 0 (= the base) or in (0, {self.high_resolution}), got {self.mid_resolution}"
            )
        for r in self.low_resolutions:
            if not 0 < r < (self.base_resolution if self.method == "anchored" else float("inf")):
                refuse("low_resolutions", f"{r} must be > 0 and below base_resolution {self.base_resolution}")
        if len(set(self.low_resolutions)) != len(self.low_resolutions):
            refuse("low_resolutions", f"repeats a resolution: {self.low_resolutions}")
        if not 1 <= self.k <= SECONDS:
            refuse("k", f"must be in [1, {SECONDS}], got {self.k}")
        if self.min_gap < 1:
            refuse("min_gap", f"must be >= 1 (1 = any two distinct seconds), got {self.min_gap}")
        if (self.k - 1) * self.min_gap + 1 > SECONDS:
            refuse(
                "min_gap", f"{self.k} anchors {self.min_gap} seconds apart do not fit in a clip of {SECONDS} seconds"
            )
        if self.adjacent < 0:
            refuse("adjacent", f"must be >= 0, got {self.adjacent}")
        if self.k * (1 + 2 * self.adjacent) > SECONDS:
            refuse(
                "adjacent",
                f"{self.k} anchors with {self.adjacent} neighbours on each side need "
                f"{self.k * (1 + 2 * self.adjacent)} seconds; a clip has {SECONDS}",
            )
        if abs(self.shift) >= SECONDS:
            refuse("shift", f"must be in ({-SECONDS}, {SECONDS}), got {self.shift}")
        if self.max_high_anchors < 1:
            refuse(
                "max_high_anchors",
                f"must be >= 1 (no anchor at high_resolution is method uniform), got {self.max_high_anchors}",
            )

    @property
    def mid(self) -> int:
        """The resolution of mid anchors and neighbours (``mid_resolution``, or the base when 0)."""
        return self.mid_resolution or self.base_resolution


@dataclasses.dataclass(frozen=True)
class ClipPlan:
    """One clip's allocation.

    Attributes:
        resolutions: the resolution of each of the 10 seconds.
        anchors: the anchor seconds (after the shift), best-scored first; ``()`` when uniform or fallen back.
        fallback: anchored was asked, uniform was given.
        reason: why it fell back (``""`` if it did not): ``flat_scores (<kind> <confidence> < <threshold>)`` or
            ``budget_infeasible (...)``; :func:`reason_code` is its first word.
        confidence: the gate's figure (nan with gate ``none`` and for uniform plans).
        tokens: the plan's total visual tokens (always the budget).
    """

    resolutions: tuple[int, ...]
    anchors: tuple[int, ...]
    fallback: bool
    reason: str
    confidence: float
    tokens: int


def reason_code(reason: str) -> str:
    """A fallback reason without its figures (``flat_scores (std 0.01 < 0.2)`` → ``flat_scores``), for counting."""
    return reason.split(" ", 1)[0]


def _used_resolutions(cfg: AllocationConfig) -> dict[str, list[int]]:
    """The config keys that name the resolutions the method spends tokens on."""
    if cfg.method == "uniform":
        return {"base_resolution": [cfg.base_resolution]}
    used = {"base_resolution": [cfg.base_resolution], "high_resolution": [cfg.high_resolution]}
    if cfg.mid_resolution:
        used["mid_resolution"] = [cfg.mid_resolution]
    used["low_resolutions"] = list(cfg.low_resolutions)
    return used


def _costs(cfg: AllocationConfig, tokens: Mapping[int, int]) -> dict[int, int]:
    """Tokens of each resolution the method uses; ConfigError naming the key of one the cache lacks."""
    for key, resolutions in _used_resolutions(cfg).items():
        missing = [r for r in resolutions if r not in tokens]
        if missing:
            raise ConfigError(
                f"config key 'allocation.{key}': {', '.join(map(str, missing))} is not among the cached resolutions "
                f"{sorted(tokens)} (features.resolutions)"
            )
    return {r: int(tokens[r]) for resolutions in _used_resolutions(cfg).values() for r in resolutions}


def allocation_budget(cfg: AllocationConfig, tokens: Mapping[int, int]) -> int:
    """Visual tokens per clip: ``10 × tokens[base_resolution]``, whatever the method."""
    return SECONDS * _costs(cfg, tokens)[cfg.base_resolution]


def _exact_mix(n: int, target: int, options: Sequence[tuple[int, int]]) -> list[int] | None:
    """Resolutions for ``n`` seconds costing exactly ``target`` tokens, highest first; None if there is none.

    ``options`` are ``(resolution, tokens)`` from the highest resolution down. The search tries the most seconds at
    the first option, then at the second, ..., so the first exact mix found is the preferred one.
    """

    def counts(i: int, left: int, budget: int) -> list[int] | None:
        cost = options[i][1]
        if i == len(options) - 1:
            return [left] if left * cost == budget else None
        for count in range(min(left, budget // cost), -1, -1):
            rest = counts(i + 1, left - count, budget - count * cost)
            if rest is not None:
                return [count, *rest]
        return None

    if n == 0:
        return [] if target == 0 else None
    if target < 0 or not options:
        return None
    found = counts(0, n, target)
    return None if found is None else [r for (r, _), c in zip(options, found, strict=True) for _ in range(c)]


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _mix_options(cfg: AllocationConfig, costs: Mapping[int, int]) -> list[tuple[int, int]]:
    return [(r, costs[r]) for r in sorted({cfg.base_resolution, *cfg.low_resolutions}, reverse=True)]


def _fixed_cost(cfg: AllocationConfig, costs: Mapping[int, int], n_anchors: int, n_neighbours: int) -> int:
    """Tokens of the anchors (the first ``max_high_anchors`` at high, the others at mid) and their neighbours."""
    n_high = min(n_anchors, cfg.max_high_anchors)
    return n_high * costs[cfg.high_resolution] + (n_anchors - n_high + n_neighbours) * costs[cfg.mid]


def check_allocation(cfg: AllocationConfig, tokens: Mapping[int, int]) -> None:
    """Refuse, before any run, a config that cannot be planned with the cached resolutions.

    Every resolution the method uses must be in ``tokens``; for ``anchored``, ``k`` anchors with all
    ``2 × adjacent`` neighbours each (none shared, none clipped at the clip's edge) must leave an exact mix of
    ``{base} ∪ low_resolutions`` for the other seconds. A clip whose arrangement differs (neighbours clipped or
    shared) may still have no exact mix: it falls back with ``budget_infeasible``.

    Raises:
        ConfigError: naming the key, e.g. ``config key 'allocation.low_resolutions': no mix of [80] pays for 2
            anchors at 176 within 1960 tokens ...``.
    """
    costs = _costs(cfg, tokens)
    if cfg.method == "uniform":
        return
    budget = allocation_budget(cfg, tokens)
    n_neighbours = 2 * cfg.adjacent * cfg.k
    rest = SECONDS - cfg.k - n_neighbours
    target = budget - _fixed_cost(cfg, costs, cfg.k, n_neighbours)
    if _exact_mix(rest, target, _mix_options(cfg, costs)) is None:
        n_high = min(cfg.k, cfg.max_high_anchors)
        at_mid = [_count(n, what) for n, what in ((cfg.k - n_high, "anchor"), (n_neighbours, "neighbour")) if n]
        mid = f" (+ {' and '.join(at_mid)} at {cfg.mid})" if at_mid else ""
        options = " and ".join(f"{r} ({t} tokens)" for r, t in _mix_options(cfg, costs))
        raise ConfigError(
            f"config key 'allocation.low_resolutions': no mix of {list(cfg.low_resolutions)} pays for "
            f"{_count(n_high, 'anchor')} at {cfg.high_resolution}{mid} within {budget} tokens: the other {rest} "
            f"seconds would need exactly {target} tokens, and no count of seconds at {options} makes that"
        )


def confidence(scores: np.ndarray, kind: str) -> float:
    """How peaked a clip's scores are (0 = flat): ``std``, ``top1_median`` or ``gini``; nan for ``none``.

    ``gini`` is the Gini coefficient of ``scores − min(scores)`` (mean absolute difference over twice the mean),
    0 when all scores are equal.
    """
    x = np.asarray(scores, dtype=np.float64)
    if kind == "none":
        return math.nan
    if kind == "std":
        return float(x.std())
    if kind == "top1_median":
        return float(x.max() - np.median(x))
    if kind == "gini":
        y = x - x.min()
        total = float(y.sum())
        return float(np.abs(y[:, None] - y[None, :]).sum() / (2 * len(y) * total)) if total > 0 else 0.0
    raise ConfigError(f"config key 'allocation.gate.kind' must be one of {', '.join(GATE_KINDS)}, got {kind!r}")


def _check_scores(scores: np.ndarray | Sequence[float]) -> np.ndarray:
    x = np.asarray(scores, dtype=np.float64)
    if x.shape != (SECONDS,):
        raise DataError(f"eventness scores must be {SECONDS} numbers (one per second), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise DataError(f"eventness scores must be finite, got {x.tolist()}")
    return x


def _pick_anchors(scores: np.ndarray, cfg: AllocationConfig) -> list[int]:
    """Anchors best-scored first: greedy by score (ties → the earlier second), each shifted and clamped to the
    clip, skipped when it lands within ``min_gap`` of one already picked."""
    anchors: list[int] = []
    for t in sorted(range(SECONDS), key=lambda s: (-scores[s], s)):
        a = min(max(t + cfg.shift, 0), SECONDS - 1)
        if all(abs(a - b) >= cfg.min_gap for b in anchors):
            anchors.append(a)
            if len(anchors) == cfg.k:
                break
    return anchors


def _plan(resolutions: Sequence[int], anchors: Sequence[int], costs: Mapping[int, int], **kwargs) -> ClipPlan:
    resolutions = tuple(int(r) for r in resolutions)
    return ClipPlan(resolutions, tuple(anchors), tokens=sum(costs[r] for r in resolutions), **kwargs)


def plan_clip(scores: np.ndarray | None, cfg: AllocationConfig, tokens: Mapping[int, int]) -> ClipPlan:
    """The allocation of one clip from its 10 eventness scores (see the module docstring).

    Args:
        scores: one score per second (ignored, and may be None, for ``uniform``).
        cfg: the allocation config.
        tokens: resolution → visual tokens it costs (the feature cache's ``tokens``).

    Raises:
        DataError: scores that are not 10 finite numbers (anchored only).
        ConfigError: a resolution the config uses is not in ``tokens``.
    """
    costs = _costs(cfg, tokens)
    uniform = [cfg.base_resolution] * SECONDS
    if cfg.method == "uniform":
        return _plan(uniform, (), costs, fallback=False, reason="", confidence=math.nan)
    x = _check_scores(scores)
    conf = confidence(x, cfg.gate.kind)
    if cfg.gate.kind != "none" and conf < cfg.gate.threshold:
        reason = f"{FLAT_SCORES} ({cfg.gate.kind} {conf:.3g} < {cfg.gate.threshold:g})"
        return _plan(uniform, (), costs, fallback=True, reason=reason, confidence=conf)

    anchors = _pick_anchors(x, cfg)
    resolutions: dict[int, int] = {
        a: cfg.high_resolution if i < cfg.max_high_anchors else cfg.mid for i, a in enumerate(anchors)
    }
    for a in anchors:
        for s in range(max(a - cfg.adjacent, 0), min(a + cfg.adjacent, SECONDS - 1) + 1):
            resolutions.setdefault(s, cfg.mid)
    # The rest pay for the anchors: the best-scored get the mix's highest resolutions (ties → the earlier second).
    rest = sorted((s for s in range(SECONDS) if s not in resolutions), key=lambda s: (-x[s], s))
    budget = allocation_budget(cfg, tokens)
    target = budget - sum(costs[r] for r in resolutions.values())
    mix = _exact_mix(len(rest), target, _mix_options(cfg, costs))
    if mix is None:
        reason = (
            f"{BUDGET_INFEASIBLE} ({_count(len(anchors), 'anchor')} and "
            f"{_count(len(resolutions) - len(anchors), 'neighbour')} leave {len(rest)} seconds for {target} tokens)"
        )
        return _plan(uniform, (), costs, fallback=True, reason=reason, confidence=conf)
    resolutions.update(zip(rest, mix, strict=True))
    return _plan([resolutions[s] for s in range(SECONDS)], anchors, costs, fallback=False, reason="", confidence=conf)


def plan_clips(
    scores: Mapping[str, np.ndarray] | None,
    video_ids: Sequence[str],
    cfg: AllocationConfig,
    tokens: Mapping[int, int],
) -> dict[str, ClipPlan]:
    """:func:`plan_clip` for each of ``video_ids`` (in that order), each plan checked to spend exactly the budget.

    Raises:
        ConfigError: the config cannot be planned (:func:`check_allocation`).
        DataError: (anchored) ``scores`` lacks some ids, or a clip's scores are not 10 finite numbers.
        AvlmError: a plan whose tokens differ from the budget (a bug: the comparison would not be fair).
    """
    check_allocation(cfg, tokens)
    budget = allocation_budget(cfg, tokens)
    if cfg.method == "uniform":
        plans = {v: plan_clip(None, cfg, tokens) for v in video_ids}
    else:
        scores = scores or {}
        missing = [v for v in video_ids if v not in scores]
        if missing:
            raise DataError(
                f"eventness scores lack {len(missing)} of {len(video_ids)} clips: {', '.join(missing[:5])}"
                f"{' …' if len(missing) > 5 else ''}"
            )
        plans = {}
        for v in video_ids:
            try:
                plans[v] = plan_clip(scores[v], cfg, tokens)
            except DataError as err:
                raise DataError(f"clip {v}: {err}") from None
    for v, plan in plans.items():
        if plan.tokens != budget:
            raise AvlmError(f"allocation of clip {v} spends {plan.tokens} tokens, not the budget {budget}: {plan}")
    return plans


def plan_summary(plans: Mapping[str, ClipPlan] | Iterable[ClipPlan]) -> dict[str, float]:
    """Figures of a split's plans, for logging.

    Returns:
        ``clips``; ``fallback_frac`` (clips that fell back); ``anchors_mean`` (anchors per clip, fallbacks count 0);
        ``high_frac`` (seconds at the highest resolution any anchor got; 0 without anchors); ``tokens_mean`` (the
        budget); ``confidence_mean`` (over clips with a gate figure, when any); ``reason/<code>`` (clips per
        fallback reason); ``resolution_frac/<r>`` (seconds at each resolution).
    """
    plans = list(plans.values() if isinstance(plans, Mapping) else plans)
    if not plans:
        return {"clips": 0.0}
    seconds = [r for p in plans for r in p.resolutions]
    anchor_resolutions = [p.resolutions[a] for p in plans for a in p.anchors]
    high = max(anchor_resolutions, default=None)
    summary = {
        "clips": float(len(plans)),
        "fallback_frac": float(np.mean([p.fallback for p in plans])),
        "anchors_mean": float(np.mean([len(p.anchors) for p in plans])),
        "high_frac": float(np.mean([r == high for r in seconds])) if high is not None else 0.0,
        "tokens_mean": float(np.mean([p.tokens for p in plans])),
    }
    figures = [p.confidence for p in plans if math.isfinite(p.confidence)]
    if figures:
        summary["confidence_mean"] = float(np.mean(figures))
    for code in sorted({reason_code(p.reason) for p in plans if p.fallback}):
        summary[f"reason/{code}"] = float(sum(p.fallback and reason_code(p.reason) == code for p in plans))
    for r in sorted(set(seconds)):
        summary[f"resolution_frac/{r}"] = float(np.mean([s == r for s in seconds]))
    return summary
