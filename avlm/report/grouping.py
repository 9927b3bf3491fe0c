"""Runs → groups: one group per configuration (the ``cfg.*`` params minus the seed and ignored params, plus chosen
tags), its runs being the seeds; and the per-seed values of a metric in a group."""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence

from avlm.stats import mean_std
from avlm.tracking.run_table import RunRecord

CONFIG_PREFIX = "cfg."
TAG_PREFIX = "tags."
MISSING = "n/a"
_SEED_SUFFIX = re.compile(r"-seed\d+$")


@dataclasses.dataclass(frozen=True)
class RunGroup:
    """The runs of one configuration, one per seed.

    Attributes:
        label: the group's name in tables and figures (unique among the report's groups).
        key: the configuration, as sorted ``(name, value)`` pairs: ``cfg.*`` params and ``tags.*`` entries.
        runs: one run per seed, in seed order (numeric seeds numerically).
        seeds: the runs' seeds, as strings, in the same order.
        duplicates: ids of further runs of a seed already present, left out (the latest started run is kept).
    """

    label: str
    key: tuple[tuple[str, str], ...]
    runs: tuple[RunRecord, ...]
    seeds: tuple[str, ...]
    duplicates: tuple[str, ...] = ()

    def get(self, name: str) -> str | None:
        """The value of a key entry (``cfg.model.fusion``, ``tags.training``), or None when not in the key."""
        return dict(self.key).get(name)

    def values(self, metric: str) -> dict[str, float]:
        """Seed → the metric's latest value, for the runs that log it."""
        return {
            seed: run.metrics[metric] for seed, run in zip(self.seeds, self.runs, strict=True) if metric in run.metrics
        }


@dataclasses.dataclass(frozen=True)
class Summary:
    """A metric over a group's seeds: mean, sample std (``ddof=1``; 0 for one seed), how many seeds had it."""

    mean: float | None
    std: float | None
    n: int
    of: int

    @classmethod
    def of_values(cls, values: Mapping[str, float] | Sequence[float], total: int | None = None) -> Summary:
        numbers = list(values.values()) if isinstance(values, Mapping) else list(values)
        total = len(numbers) if total is None else total
        if not numbers:
            return cls(None, None, 0, total)
        mean, std = mean_std(numbers)
        return cls(mean, std, len(numbers), total)


def summarize(group: RunGroup, metric: str) -> Summary:
    """:class:`Summary` of ``metric`` over the group's seeds."""
    return Summary.of_values(group.values(metric), len(group.runs))


def seed_order(seed: str) -> tuple[int, int, str]:
    """Sort key of a seed string: integers by value, anything else after them by text."""
    return (0, int(seed), "") if re.fullmatch(r"-?\d+", seed) else (1, 0, seed)


def run_field(run: RunRecord, name: str, tag_defaults: Mapping[str, str | None] | None = None) -> str | None:
    """A run's value for ``name``: ``tags.X`` a tag (or its default), ``params.X`` or any other name a param."""
    if name.startswith(TAG_PREFIX):
        tag = name[len(TAG_PREFIX) :]
        return run.tags.get(tag, (tag_defaults or {}).get(tag))
    if name.startswith("params."):
        name = name[len("params.") :]
    return run.params.get(name)


def configuration_key(
    run: RunRecord,
    *,
    seed_param: str = "cfg.seed",
    ignore: Iterable[str] = (),
    tag_defaults: Mapping[str, str | None] | None = None,
) -> tuple[tuple[str, str], ...]:
    """The run's configuration: its ``cfg.*`` params less the seed and the ``ignore`` patterns, plus the tags of
    ``tag_defaults`` (a tag the run lacks takes its default, or ``n/a``)."""
    patterns = list(ignore)
    entries = {
        name: value
        for name, value in run.params.items()
        if name.startswith(CONFIG_PREFIX)
        and name != seed_param
        and not any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
    }
    for tag in tag_defaults or {}:
        value = run_field(run, f"{TAG_PREFIX}{tag}", tag_defaults)
        entries[f"{TAG_PREFIX}{tag}"] = MISSING if value is None else value
    return tuple(sorted(entries.items()))


def group_runs(
    runs: Iterable[RunRecord],
    *,
    seed_param: str = "cfg.seed",
    ignore: Iterable[str] = (),
    tag_defaults: Mapping[str, str | None] | None = None,
    label: Sequence[str] | None = None,
) -> list[RunGroup]:
    """Group runs by configuration (see :func:`configuration_key`), one run per seed, labelled and sorted by label.

    Args:
        runs: the runs (any order).
        seed_param: the seed's param; a run without it counts as seed ``n/a``.
        ignore: ``fnmatch`` patterns of params that are not part of a configuration.
        tag_defaults: tags that are, with the value a run without the tag has (None: ``n/a``).
        label: the key entries whose values name a group (joined by spaces); None = ``name=value`` of the entries
            that differ between groups. Groups whose labels coincide get the entries that tell them apart added.

    Returns:
        The groups, sorted by label (then key), so that tables list them in a stable order.
    """
    ignore = list(ignore)
    by_key: dict[tuple[tuple[str, str], ...], dict[str, list[RunRecord]]] = {}
    for run in runs:
        key = configuration_key(run, seed_param=seed_param, ignore=ignore, tag_defaults=tag_defaults)
        seed = run.params.get(seed_param, MISSING)
        by_key.setdefault(key, {}).setdefault(seed, []).append(run)
    unlabelled = []
    for key, by_seed in by_key.items():
        seeds = sorted(by_seed, key=seed_order)
        kept, duplicates = [], []
        for seed in seeds:
            candidates = sorted(by_seed[seed], key=lambda r: (r.start_time, r.run_id))
            kept.append(candidates[-1])  # the latest: a re-run of a seed replaces the earlier attempt
            duplicates += [r.run_id for r in candidates[:-1]]
        unlabelled.append((key, tuple(kept), tuple(seeds), tuple(sorted(duplicates))))
    labels = _labels([key for key, *_ in unlabelled], [runs for _, runs, *_ in unlabelled], label, tag_defaults)
    groups = [
        RunGroup(label=text, key=key, runs=kept, seeds=seeds, duplicates=dupes)
        for text, (key, kept, seeds, dupes) in zip(labels, unlabelled, strict=True)
    ]
    return sorted(groups, key=lambda g: (g.label, g.key))


def short_name(name: str) -> str:
    """``cfg.model.fusion`` → ``model.fusion``, ``tags.training`` → ``training``: how labels name key entries."""
    for prefix in (CONFIG_PREFIX, TAG_PREFIX):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def _differing(keys: Sequence[tuple[tuple[str, str], ...]]) -> list[str]:
    names = sorted({name for key in keys for name, _ in key})
    as_dicts = [dict(key) for key in keys]
    return [name for name in names if len({d.get(name, MISSING) for d in as_dicts}) > 1]


def _labels(
    keys: Sequence[tuple[tuple[str, str], ...]],
    runs: Sequence[Sequence[RunRecord]],
    label: Sequence[str] | None,
    tag_defaults: Mapping[str, str | None] | None,
) -> list[str]:
    if label:
        texts = [
            " ".join(dict(key).get(name) or run_field(members[0], name, tag_defaults) or MISSING for name in label)
            for key, members in zip(keys, runs, strict=True)
        ]
    else:
        differing = _differing(keys)
        texts = [", ".join(f"{short_name(n)}={dict(key).get(n, MISSING)}" for n in differing) for key in keys]
        if len(keys) == 1:
            stems = {_SEED_SUFFIX.sub("", run.run_name) for run in runs[0]}
            texts = [stems.pop() if len(stems) == 1 and "" not in stems else "all runs"]
    # Labels that coincide get the entries that tell their groups apart.
    final = list(texts)
    for text in set(texts):
        same = [i for i, t in enumerate(texts) if t == text]
        if len(same) < 2:
            continue
        differing = _differing([keys[i] for i in same])
        for i in same:
            extra = ", ".join(f"{short_name(n)}={dict(keys[i]).get(n, MISSING)}" for n in differing)
            final[i] = f"{text} ({extra})" if text else extra
    return final
