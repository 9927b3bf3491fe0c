"""Where an allocation gains or loses against its baseline: ``diagnose.json`` and its Markdown view.

Both sides are the per-clip outcomes (:class:`ClipOutcome`, a run's ``predictions/<split>.json``) of runs paired by
seed and by clip. Besides the overall segment accuracy, the report splits the clips into buckets by the candidate's
plan (number of anchors, anchor-to-event distance, how many anchors got the high resolution, fallback) and by the
clip's event length, gives the candidate − baseline Δ of each bucket, and ranks the buckets that lose (the log's
"fallback dilution" and "2-high harm" are two such buckets). Anchor precision / recall say how often the anchors land
on event seconds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from avlm.ave.allocation import SECONDS, reason_code
from avlm.errors import DataError

logger = logging.getLogger(__name__)

# Bucket values in display order; a clip without anchors (uniform, fallback) has distance "no_anchor".
BUCKET_VALUES: dict[str, tuple[str, ...]] = {
    "n_anchors": tuple(str(n) for n in range(SECONDS + 1)),
    "anchor_event_distance": ("0", "1", "2", ">=3", "no_event", "no_anchor"),
    "regime": ("fallback", "0-high", "1-high", "2-high", "k-high"),
    "event_length": ("0", "1-2", "3-5", "6-9", "10"),
}
_SHOWN = 5


@dataclasses.dataclass
class ClipOutcome:
    """One clip of one run: its labels and predictions per second, its eventness scores and its plan.

    Attributes:
        video_id: the clip.
        labels: class per second (0 = background).
        predictions: predicted class per second.
        scores: eventness score per second.
        resolutions: the resolution each second was seen at.
        anchors: the plan's anchor seconds (empty when uniform or fallen back).
        fallback: anchored was asked, uniform was given.
        reason: why it fell back ("" if it did not).
    """

    video_id: str
    labels: list[int]
    predictions: list[int]
    scores: list[float]
    resolutions: list[int]
    anchors: list[int]
    fallback: bool
    reason: str

    def __post_init__(self) -> None:
        # Plain Python values (the recipe passes numpy arrays and tuples), checked once here.
        if not isinstance(self.video_id, str) or not self.video_id:
            raise DataError(f"clip outcome: 'video_id' must be a non-empty string, got {self.video_id!r}")
        for name, kind in (("labels", int), ("predictions", int), ("scores", float), ("resolutions", int)):
            values = _numbers(self.video_id, name, getattr(self, name), kind)
            if len(values) != SECONDS:
                raise DataError(f"clip {self.video_id}: '{name}' must hold {SECONDS} values, got {len(values)}")
            setattr(self, name, values)
        self.anchors = _numbers(self.video_id, "anchors", self.anchors, int)
        if any(not 0 <= a < SECONDS for a in self.anchors) or len(set(self.anchors)) != len(self.anchors):
            raise DataError(
                f"clip {self.video_id}: 'anchors' must be distinct seconds in [0, {SECONDS}), got {self.anchors}"
            )
        if not isinstance(self.fallback, bool):
            raise DataError(f"clip {self.video_id}: 'fallback' must be true or false, got {self.fallback!r}")
        if not isinstance(self.reason, str):
            raise DataError(f"clip {self.video_id}: 'reason' must be a string, got {self.reason!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClipOutcome:
        """The outcome of a :meth:`to_dict` mapping; DataError naming the missing or unknown keys."""
        if not isinstance(data, Mapping):
            raise DataError(f"clip outcome: expected an object, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        missing, unknown = [n for n in names if n not in data], sorted(set(data) - set(names))
        if missing or unknown:
            raise DataError(f"clip outcome: missing keys {missing}, unknown keys {unknown} (expected {names})")
        return cls(**{n: data[n] for n in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def correct(self) -> int:
        """Seconds predicted right."""
        return sum(p == y for p, y in zip(self.predictions, self.labels, strict=True))

    def event_seconds(self) -> list[int]:
        return [t for t, y in enumerate(self.labels) if y != 0]


def _numbers(video_id: str, name: str, values: Any, kind: type) -> list:
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise DataError(f"clip {video_id}: '{name}' must be a list of numbers, got {values!r}")
    out = []
    for v in values:
        v = v.item() if hasattr(v, "item") else v  # numpy scalars
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
            raise DataError(f"clip {video_id}: '{name}' must hold {kind.__name__}s, got {v!r}")
        out.append(kind(v))
    return out


def write_outcomes(path: str | Path, outcomes: Mapping[str, ClipOutcome] | Iterable[ClipOutcome]) -> Path:
    """Write outcomes as a JSON list of :meth:`ClipOutcome.to_dict` objects (``predictions/<split>.json``)."""
    path = Path(path)
    rows = list(outcomes.values() if isinstance(outcomes, Mapping) else outcomes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([o.to_dict() for o in rows], indent=1) + "\n", encoding="utf-8")
    return path


def read_outcomes(path: str | Path) -> dict[str, ClipOutcome]:
    """Outcomes by video id from a :func:`write_outcomes` file.

    Raises:
        DataError: naming the file and the item: not JSON, not a list, a bad item, a video id twice.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"outcomes file {path} does not exist")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"outcomes file {path}: not valid JSON: {err}") from None
    if not isinstance(rows, list):
        raise DataError(f"outcomes file {path}: expected a list of clip outcomes, got {type(rows).__name__}")
    outcomes: dict[str, ClipOutcome] = {}
    for index, row in enumerate(rows):
        try:
            outcome = ClipOutcome.from_dict(row)
        except DataError as err:
            raise DataError(f"outcomes file {path}, item [{index}]: {err}") from None
        if outcome.video_id in outcomes:
            raise DataError(f"outcomes file {path}, item [{index}]: video id {outcome.video_id!r} appears twice")
        outcomes[outcome.video_id] = outcome
    return outcomes


def _anchor_counts(outcomes: Iterable[ClipOutcome]) -> dict[str, int]:
    """Over the clips that did not fall back: anchors, anchors on an event second, event clips, event clips with an
    anchor on an event second."""
    counts = Counter(anchors=0, on_event=0, event_clips=0, event_clips_hit=0)
    for o in outcomes:
        if o.fallback:
            continue
        events = set(o.event_seconds())
        hits = sum(a in events for a in o.anchors)
        counts["anchors"] += len(o.anchors)
        counts["on_event"] += hits
        if events:
            counts["event_clips"] += 1
            counts["event_clips_hit"] += hits > 0
    return dict(counts)


def anchor_hits(outcomes: Iterable[ClipOutcome]) -> dict[str, float]:
    """Anchor precision (anchors on an event second / anchors) and recall (event clips with an anchor on an event
    second / event clips), over the clips that did not fall back; nan when a denominator is 0."""
    c = _anchor_counts(outcomes)
    return {
        "anchor_precision": c["on_event"] / c["anchors"] if c["anchors"] else math.nan,
        "anchor_recall": c["event_clips_hit"] / c["event_clips"] if c["event_clips"] else math.nan,
    }


def clip_buckets(outcome: ClipOutcome, high_resolution: int) -> dict[str, str]:
    """The buckets of one clip under its (candidate's) plan: see :data:`BUCKET_VALUES`."""
    events = outcome.event_seconds()
    n_events = len(events)
    if not outcome.anchors:
        distance = "no_anchor"
    elif not events:
        distance = "no_event"
    else:
        d = min(abs(a - e) for a in outcome.anchors for e in events)
        distance = str(d) if d < 3 else ">=3"
    n_high = sum(outcome.resolutions[a] == high_resolution for a in outcome.anchors)
    regime = "fallback" if outcome.fallback else (f"{n_high}-high" if n_high <= 2 else "k-high")
    length = next(
        name for name, top in (("0", 0), ("1-2", 2), ("3-5", 5), ("6-9", 9), ("10", SECONDS)) if n_events <= top
    )
    return {
        "n_anchors": str(len(outcome.anchors)),
        "anchor_event_distance": distance,
        "regime": regime,
        "event_length": length,
    }


def _paired(
    candidate: Mapping[int, Mapping[str, ClipOutcome]], baseline: Mapping[int, Mapping[str, ClipOutcome]]
) -> tuple[list[int], list[str]]:
    """The seeds and clip ids both sides share exactly; DataError if they differ or a clip's labels differ."""
    seeds = sorted(candidate)
    if not seeds:
        raise DataError("diagnose: the candidate has no seeds")
    if set(seeds) != set(baseline):
        raise DataError(
            f"diagnose: the candidate has seeds {seeds}, the baseline {sorted(baseline)}: pair them by seed"
        )
    ids = sorted(candidate[seeds[0]])
    for seed in seeds:
        for name, side in (("candidate", candidate), ("baseline", baseline)):
            if set(side[seed]) != set(ids):
                odd = sorted(set(side[seed]) ^ set(ids))
                raise DataError(
                    f"diagnose: the {name}'s clips of seed {seed} differ from the candidate's of seed {seeds[0]} "
                    f"({len(odd)} clips: {', '.join(odd[:_SHOWN])}{' …' if len(odd) > _SHOWN else ''})"
                )
        for v in ids:
            if candidate[seed][v].labels != baseline[seed][v].labels:
                raise DataError(f"diagnose: seed {seed}, clip {v}: the candidate's labels differ from the baseline's")
    return seeds, ids


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def diagnose(
    candidate: Mapping[int, Mapping[str, ClipOutcome]],
    baseline: Mapping[int, Mapping[str, ClipOutcome]],
    *,
    high_resolution: int,
) -> dict:
    """Candidate vs baseline, paired by seed and by clip: overall, fallback, anchors, buckets, harmful buckets.

    Buckets follow the candidate's plan of each (seed, clip). Per bucket value: ``clips`` = clips per seed (mean over
    all seeds), ``candidate`` / ``baseline`` = segment accuracy over the bucket's seconds and ``delta`` their
    difference, each the mean over the seeds where the bucket holds clips. ``harmful`` lists the values with
    Δ < 0, most ``seconds_lost`` first (baseline − candidate correct seconds per seed, mean over all seeds: within
    one bucket kind they add up to −Δ × seconds per seed). Fallback and anchor figures pool all (seed, clip) pairs.

    Args:
        candidate: seed → video id → outcome of the candidate's run of that seed.
        baseline: the same for the baseline (same seeds, same clips, same labels).
        high_resolution: the candidate's ``allocation.high_resolution`` (for the regime buckets).

    Returns:
        A JSON-able dict: ``seeds``, ``clips``, ``accuracy`` (``candidate``, ``baseline``, ``delta``, ``per_seed``),
        ``fallback`` (``frac``, ``baseline_frac``, ``reasons``), ``anchors`` (``precision``, ``recall``, counts;
        None when undefined), ``buckets`` (kind → value → figures), ``harmful``.

    Raises:
        DataError: the seeds or clips of the two sides differ, or a clip's labels do.
    """
    seeds, ids = _paired(candidate, baseline)
    per_seed = []
    # kind -> value -> seed -> [clips, seconds, candidate correct, baseline correct]
    tally: dict[str, dict[str, dict[int, list[int]]]] = {k: defaultdict(dict) for k in BUCKET_VALUES}
    for seed in seeds:
        cand_correct = base_correct = 0
        for v in ids:
            c, b = candidate[seed][v].correct(), baseline[seed][v].correct()
            cand_correct, base_correct = cand_correct + c, base_correct + b
            for kind, value in clip_buckets(candidate[seed][v], high_resolution).items():
                row = tally[kind][value].setdefault(seed, [0, 0, 0, 0])
                for i, n in enumerate((1, SECONDS, c, b)):
                    row[i] += n
        total = SECONDS * len(ids)
        per_seed.append(
            {
                "seed": seed,
                "candidate": cand_correct / total,
                "baseline": base_correct / total,
                "delta": (cand_correct - base_correct) / total,
            }  # fmt: skip
        )

    buckets: dict[str, dict[str, dict[str, float]]] = {}
    harmful = []
    for kind, order in BUCKET_VALUES.items():
        buckets[kind] = {}
        for value in sorted(tally[kind], key=order.index):
            rows = tally[kind][value]
            figures = {
                "clips": math.fsum(r[0] for r in rows.values()) / len(seeds),
                "candidate": _mean([r[2] / r[1] for r in rows.values()]),
                "baseline": _mean([r[3] / r[1] for r in rows.values()]),
                "delta": _mean([(r[2] - r[3]) / r[1] for r in rows.values()]),
            }
            buckets[kind][value] = figures
            if figures["delta"] < 0:
                lost = math.fsum(r[3] - r[2] for r in rows.values()) / len(seeds)
                harmful.append(
                    {
                        "bucket": kind,
                        "value": value,
                        "clips": figures["clips"],
                        "delta": figures["delta"],
                        "seconds_lost": lost,
                    }
                )
    kinds = list(BUCKET_VALUES)
    harmful.sort(
        key=lambda h: (
            -h["seconds_lost"],
            h["delta"],
            kinds.index(h["bucket"]),
            BUCKET_VALUES[h["bucket"]].index(h["value"]),
        )
    )

    pairs = [candidate[s][v] for s in seeds for v in ids]
    counts = _anchor_counts(pairs)
    hits = anchor_hits(pairs)
    reasons = Counter(reason_code(o.reason) for o in pairs if o.fallback)
    return {
        "seeds": seeds,
        "clips": len(ids),
        "accuracy": {
            "candidate": _mean([s["candidate"] for s in per_seed]),
            "baseline": _mean([s["baseline"] for s in per_seed]),
            "delta": _mean([s["delta"] for s in per_seed]),
            "per_seed": per_seed,
        },
        "fallback": {
            "frac": sum(o.fallback for o in pairs) / len(pairs),
            "baseline_frac": sum(baseline[s][v].fallback for s in seeds for v in ids) / len(pairs),
            "reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        },
        "anchors": {
            "precision": _finite_or_none(hits["anchor_precision"]),
            "recall": _finite_or_none(hits["anchor_recall"]),
            **counts,
        },
        "buckets": buckets,
        "harmful": harmful,
    }


def _number(value: float | None, digits: int = 4, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def diagnose_markdown(report: Mapping[str, Any]) -> str:
    """``diagnose.md``: the overall figures, fallback, anchors, one table per bucket kind and the harmful buckets."""
    title = f"# Diagnose: {report['candidate']}" if isinstance(report.get("candidate"), str) else "# Diagnose"
    context = ", ".join(f"{key} {report[key]}" for key in ("stage", "split") if isinstance(report.get(key), str))
    acc, fallback, anchors = report["accuracy"], report["fallback"], report["anchors"]
    lines = [
        title,
        "",
        *([f"{context.capitalize()}.", ""] if context else []),
        f"Seeds {', '.join(map(str, report['seeds']))}, {report['clips']} clips per seed, paired by seed and clip. "
        "Δ = candidate − baseline segment accuracy, mean over seeds.",
        "",
        "## Overall",
        "",
        *_table(
            ["seed", "candidate", "baseline", "Δ"],
            [
                *(
                    [str(s["seed"]), _number(s["candidate"]), _number(s["baseline"]), _number(s["delta"], signed=True)]
                    for s in acc["per_seed"]
                ),
                ["mean", _number(acc["candidate"]), _number(acc["baseline"]), _number(acc["delta"], signed=True)],
            ],
        ),
        "",
        "## Fallback",
        "",
        f"The candidate fell back to uniform on {fallback['frac']:.1%} of (seed, clip) pairs (baseline: "
        f"{fallback['baseline_frac']:.1%}).",
    ]
    if fallback["reasons"]:
        lines += ["", *_table(["reason", "(seed, clip) pairs"], ([r, str(n)] for r, n in fallback["reasons"].items()))]
    lines += [
        "",
        "## Anchors",
        "",
        f"Over the clips that did not fall back: precision {_number(anchors['precision'])} ({anchors['on_event']} of "
        f"{anchors['anchors']} anchors on an event second), recall {_number(anchors['recall'])} "
        f"({anchors['event_clips_hit']} of {anchors['event_clips']} event clips with an anchor on an event second).",
        "",
        "## Buckets",
        "",
        "By the candidate's plan of each (seed, clip); clips: per seed, mean over seeds; accuracies and Δ: mean over "
        "the seeds where the bucket holds clips.",
    ]
    for kind, values in report["buckets"].items():
        rows = (
            [
                value,
                _number(f["clips"], 1),
                _number(f["candidate"]),
                _number(f["baseline"]),
                _number(f["delta"], signed=True),
            ]
            for value, f in values.items()
        )
        lines += ["", f"### {kind}", "", *_table([kind, "clips", "candidate", "baseline", "Δ"], rows)]
    lines += ["", "## Harmful buckets", ""]
    if report["harmful"]:
        lines.append("Δ < 0, most seconds lost per seed first.")
        lines += [
            "",
            *_table(
                ["bucket", "value", "clips", "Δ", "seconds lost"],
                (
                    [
                        h["bucket"],
                        h["value"],
                        _number(h["clips"], 1),
                        _number(h["delta"], signed=True),
                        _number(h["seconds_lost"], 2),
                    ]
                    for h in report["harmful"]
                ),
            ),
        ]
    else:
        lines.append("None: no bucket has Δ < 0.")
    return "\n".join(lines) + "\n"


# How a run's per-clip outcomes of a split are stored among its artifacts (written by the train_ave recipe).
PREDICTIONS_ARTIFACT = "predictions/{split}.json"


def diagnose_runs(
    candidate: Mapping[int, str],
    baseline: Mapping[int, str],
    *,
    split: str,
    download: Callable[[str, str, Path], Path | None],
    folder: Path,
) -> dict | None:
    """:func:`diagnose` of runs: each run's ``predictions/<split>.json`` downloaded, paired by seed, the report
    written as ``diagnose.json`` and ``diagnose.md`` in ``folder``.

    Args:
        candidate / baseline: seed → run id (the same seeds on both sides).
        split: the evaluated split whose predictions are compared (``val`` or ``test``).
        download: ``download(run_id, artifact_path, destination)`` → the local file, or None when the run has none
            (:meth:`avlm.tracking.children.SweepRuns.download_file`).
        folder: where the report files go (downloads go to a sub-folder removed afterwards).

    Returns:
        The report (with ``split`` added), or None when a run has no predictions for the split.
    """
    sides: dict[str, dict[int, dict[str, ClipOutcome]]] = {"candidate": {}, "baseline": {}}
    scratch = folder / "downloads"
    try:
        for name, runs in (("candidate", candidate), ("baseline", baseline)):
            for seed, run_id in sorted(runs.items()):
                path = download(run_id, PREDICTIONS_ARTIFACT.format(split=split), scratch / name)
                if path is None:
                    logger.warning("run %s has no %s: no diagnose", run_id, PREDICTIONS_ARTIFACT.format(split=split))
                    return None
                sides[name][seed] = read_outcomes(path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # the anchors' resolution as the candidate's runs were planned (the config may have set it anywhere)
    high = max(r for clips in sides["candidate"].values() for clip in clips.values() for r in clip.resolutions)
    report = {**diagnose(sides["candidate"], sides["baseline"], high_resolution=high), "split": split}
    (folder / "diagnose.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (folder / "diagnose.md").write_text(diagnose_markdown(report), encoding="utf-8")
    return report
