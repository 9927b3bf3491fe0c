"""The report spec: which runs, how they group, which tables and figures, and the targets a study must meet.

A spec is a YAML file (``examples/reports/*.yaml``, each opening with the command that runs it) loaded into the
typed :class:`ReportSpec`; an unknown key, a wrong type or a bad value stops the report before it reads a run,
naming the key and the file (:func:`load_report_spec`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from avlm.config import config_from_dict, config_to_dict, load_config
from avlm.errors import ConfigError
from avlm.tracking.mlflow_logger import TrackingConfig

KINDS = ("cvs", "captioning", "generic", "ave")
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED", "RUNNING", "SCHEDULED")
CAPTION_FIGURES = ("F1", "F2", "pareto", "gate_heatmap", "stability")
# The experiment each kind reads when the spec names none: the one its recipe logs to by default.
DEFAULT_EXPERIMENTS = {"cvs": ["avlm-cvs"], "captioning": ["avlm-caption"], "generic": [], "ave": ["avlm-ave"]}
# Params that never make two runs different configurations: where outputs go, resuming, tracking, registration.
DEFAULT_IGNORED_PARAMS = ["cfg.output_dir", "cfg.resume", "cfg.tracking.*", "cfg.registry.*", "cfg.data.cache_dir"]
# A captioning run without a `training` tag was trained with cross-entropy only; +SCST runs carry training=xe+scst.
DEFAULT_GROUP_TAGS = {"cvs": [], "captioning": ["training=xe"], "generic": [], "ave": []}
_TARGET = re.compile(
    r"^\s*(?P<metric>\S+)\s*(?P<op>>=|<=|>|<)\s*(?P<threshold>\S+)\s*(?:@\s*(?P<group>.+?))?"
    r"\s*(?:\bin\s+(?P<table>\S+))?\s*$"
)


@dataclasses.dataclass
class RunSelection:
    """Which runs the report reads.

    Attributes:
        experiments: MLflow experiment names; empty = the kind's recipe experiment (``avlm-cvs``, ``avlm-caption``,
            ``avlm-ave``).
        filter: an MLflow search filter, e.g. ``"tags.dataset = 'cvs-demo'"``; empty = every run.
        statuses: keep runs with these statuses only (a FAILED run's metrics stop where it failed).
    """

    experiments: list[str] = dataclasses.field(default_factory=list)
    filter: str = ""
    statuses: list[str] = dataclasses.field(default_factory=lambda: ["FINISHED"])

    def __post_init__(self) -> None:
        for status in self.statuses:
            if status not in RUN_STATUSES:
                raise ConfigError(f"config key 'runs.statuses': {status!r} is not one of {', '.join(RUN_STATUSES)}")


@dataclasses.dataclass
class Grouping:
    """How runs become groups: one group per configuration, its runs being the seeds.

    Attributes:
        seed_param: the param holding the seed (left out of the configuration, one run per value kept).
        ignore: ``fnmatch`` patterns of ``cfg.*`` params left out of the configuration too.
        tags: tags that are part of the configuration, as ``name`` or ``name=value`` (the value a run without the
            tag has); None = the kind's default (captioning: ``training=xe``, so +SCST rows stand apart).
        label: params (``cfg.model.fusion``) or tags (``tags.training``) whose values name a group; None = the
            params and tags whose values differ between the groups.
    """

    seed_param: str = "cfg.seed"
    ignore: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_IGNORED_PARAMS))
    tags: list[str] | None = None
    label: list[str] | None = None


@dataclasses.dataclass
class Target:
    """A figure the study must reach (the "publishable?" checklist), e.g. ``test/SPIDEr >= 0.50``.

    Attributes:
        metric: the metric as logged (``final/test_SPIDEr``) or as ``<split>/<name>`` (``test/SPIDEr``), which
            means the best checkpoint's ``final/<split>_<name>`` when runs log it (``val/mAP`` is ``final/val_mAP``,
            not the last epoch's ``val/mAP``).
        op: how the measured figure compares with the threshold.
        threshold: the figure to reach.
        group: the label of the group measured; empty = the best group for that metric (highest mean for ``>`` and
            ``>=``, lowest for ``<`` and ``<=``).
        table: captioning: the results table (``T2``) whose groups are measured; empty = the first table (the main
            dataset). Other kinds: empty, every group.
    """

    metric: str
    op: Literal[">", ">=", "<", "<="] = ">="
    threshold: float = 0.0
    group: str = ""
    table: str = ""

    @property
    def text(self) -> str:
        text = f"{self.metric} {self.op} {self.threshold:g}"
        return text + (f" @ {self.group}" if self.group else "") + (f" in {self.table}" if self.table else "")


@dataclasses.dataclass
class StatsSettings:
    """The statistics of the report's intervals and tests (see ``avlm.stats``).

    Attributes:
        confidence: of every confidence interval.
        n_resamples: bootstrap resamples.
        seed: the bootstrap's random seed (fixed, so the same runs give the same intervals).
        ci_method: ``percentile`` or ``bca`` for intervals over seeds and items. Over a handful of seeds BCa's
            jackknife has too few points to estimate its acceleration, hence the percentile default.
        paired_test: the test over seeds when runs have no per-item scores (``wilcoxon``, ``ttest``, ``permutation``).
    """

    confidence: float = 0.95
    n_resamples: int = 10_000
    seed: int = 0
    ci_method: Literal["percentile", "bca"] = "percentile"
    paired_test: Literal["ttest", "wilcoxon", "permutation"] = "wilcoxon"

    def __post_init__(self) -> None:
        if not 0 < self.confidence < 1:
            raise ConfigError(f"config key 'stats.confidence' must be in (0, 1), got {self.confidence}")
        if self.n_resamples < 1:
            raise ConfigError(f"config key 'stats.n_resamples' must be >= 1, got {self.n_resamples}")


@dataclasses.dataclass
class CvsSection:
    """The CVS experiment table (as in the V-JEPA research log) and the entropy-per-layer comparison.

    Attributes:
        split: the split of the table's mAP and per-criterion AP (``final/<split>_mAP`` of the best checkpoint).
        criteria: the criteria with an AP column (``final/<split>_AP_<criterion>``).
        test_split: a column of ``final/<test_split>_mAP`` when runs have it; empty = none.
        band: the band of the val mAP curves over seeds: ``minmax`` or ``std`` (mean ± one sample std).
    """

    split: str = "val"
    criteria: list[str] = dataclasses.field(default_factory=lambda: ["C1", "C2", "C3"])
    test_split: str = "test"
    band: Literal["minmax", "std"] = "minmax"


@dataclasses.dataclass
class CaptionTable:
    """One results table (T1: the main dataset, T2: generalisation).

    Attributes:
        name: the table's name (its file name).
        title: shown above it; empty = the name.
        split: the split scored (``final/<split>_<metric>``).
        where: only runs whose params (``cfg.data.dataset``) or tags (``tags.dataset``) have these values.
    """

    name: str
    title: str = ""
    split: str = "test"
    where: Any = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.where, Mapping) or not all(
            isinstance(k, str) and isinstance(v, (str, int, float, bool)) for k, v in self.where.items()
        ):
            raise ConfigError(f"captioning table {self.name!r}: 'where' must map param or tag names to values")
        self.where = {key: str(value) for key, value in self.where.items()}


@dataclasses.dataclass
class CaptioningSection:
    """Captioning tables (T1/T2) and figures (F1, F2, Pareto, gate heatmap, stability frontier).

    Attributes:
        tables: the results tables; each row a system (group), XE and +SCST rows apart.
        metrics: the metric columns, as the recipe names them.
        primary: the primary metric, in order of preference: the first that every run logs on the table's split
            (SPIDEr needs SPICE; when it cannot run, CIDEr-D), used by F1, F2, Pareto and the stability frontier.
        system: the param or tag naming a system.
        candidate: the value of ``system`` that F2 compares with the best other system.
        compare_training: the ``training`` tag value of the groups F2 compares (XE with XE).
        curve_split: the split of F1's curves (``<curve_split>/<primary>`` per epoch).
        band: F1's band over seeds: ``minmax`` or ``std`` (mean ± one sample std).
        retention_metric: the retention metric of the stability frontier; empty = the ``retention/*`` metric the
            runs log.
        figures: which of F1, F2, pareto, gate_heatmap, stability to draw.
    """

    tables: list[CaptionTable] = dataclasses.field(
        default_factory=lambda: [CaptionTable(name="T1", title="T1: main results")]
    )
    metrics: list[str] = dataclasses.field(
        default_factory=lambda: ["BLEU_4", "METEOR", "ROUGE_L", "CIDEr_D", "SPICE", "SPIDEr"]
    )
    primary: list[str] = dataclasses.field(default_factory=lambda: ["SPIDEr", "CIDEr_D"])
    system: str = "cfg.model.fusion"
    candidate: str = "additive"
    compare_training: str = "xe"
    curve_split: str = "val"
    band: Literal["minmax", "std"] = "minmax"
    retention_metric: str = ""
    figures: list[str] = dataclasses.field(default_factory=lambda: list(CAPTION_FIGURES))

    def __post_init__(self) -> None:
        for figure in self.figures:
            if figure not in CAPTION_FIGURES:
                raise ConfigError(
                    f"config key 'captioning.figures': {figure!r} is not one of {', '.join(CAPTION_FIGURES)}"
                )
        if not self.primary:
            raise ConfigError("config key 'captioning.primary' must name at least one metric")
        names = [table.name for table in self.tables]
        if not names:
            raise ConfigError("config key 'captioning.tables' must list at least one table")
        if len(set(names)) != len(names):
            raise ConfigError(f"config key 'captioning.tables': table names must differ, got {names}")


@dataclasses.dataclass
class AveSection:
    """AVE accuracy against the visual token budget: uniform allocation as a line through its budgets, each anchored
    configuration as a marker at its own budget.

    Attributes:
        split: the split of the accuracy and the fallback fraction (``final/<split>_accuracy`` of the best
            checkpoint, ``alloc/<split>_fallback_frac``).
        test_split: a column of ``final/<test_split>_accuracy`` when runs have it (``eval.test=true``); empty = none.
        budget_metric: the visual tokens per clip each run logs (the ``token_budget`` tag when a run lacks it).
        log_x: draw the budget axis on a log scale (resolutions grow the tokens quadratically).
    """

    split: str = "val"
    test_split: str = "test"
    budget_metric: str = "alloc/tokens_per_clip"
    log_x: bool = True

    def __post_init__(self) -> None:
        if not self.split:
            raise ConfigError("config key 'ave.split' must name a split (val, test)")


@dataclasses.dataclass
class GenericSection:
    """A "metric × group" table with bootstrap CIs over seeds, for any recipe.

    Attributes:
        metrics: metric keys as logged (``best/val/mAP``) or as ``<split>/<name>`` (see :class:`Target`).
    """

    metrics: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ReportSpec:
    """A report: which runs, how they group, the kind's tables and figures, and the targets.

    Attributes:
        name: the report's name (its run name is ``report-<name>``, its folder ``<output_dir>/<name>``).
        kind: ``cvs``, ``captioning``, ``generic`` or ``ave``; each kind adds its tables and figures, and any spec
            may add a generic table (``generic.metrics``).
        runs: which runs to read.
        group: how runs group into configurations.
        targets: the checklist, each a :class:`Target` mapping or a string ``"METRIC OP THRESHOLD [@ GROUP] [in
            TABLE]"``.
        stats: the intervals' and tests' settings.
        digits: decimals of every figure in the tables.
        output_dir: the local folder the report is written under before it is logged.
        tracking: the store the runs are read from, and the report run's experiment (empty = ``avlm-report``,
            ignored under ``mlflow run``, which made the run).
    """

    name: str
    kind: Literal["cvs", "captioning", "generic", "ave"]
    runs: RunSelection = dataclasses.field(default_factory=RunSelection)
    group: Grouping = dataclasses.field(default_factory=Grouping)
    targets: list[Any] = dataclasses.field(default_factory=list)
    stats: StatsSettings = dataclasses.field(default_factory=StatsSettings)
    digits: int = 4
    cvs: CvsSection = dataclasses.field(default_factory=CvsSection)
    captioning: CaptioningSection = dataclasses.field(default_factory=CaptioningSection)
    generic: GenericSection = dataclasses.field(default_factory=GenericSection)
    ave: AveSection = dataclasses.field(default_factory=AveSection)
    output_dir: str = "outputs/reports"
    tracking: TrackingConfig = dataclasses.field(default_factory=lambda: TrackingConfig(system_metrics=False))

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ConfigError(
                f"config key 'name': {self.name!r} must be letters, digits, '_', '.', '-' (a folder name)"
            )
        if not self.runs.experiments:
            self.runs.experiments = list(DEFAULT_EXPERIMENTS[self.kind])
        if not self.runs.experiments:
            raise ConfigError(f"config key 'runs.experiments': a {self.kind} report must name its experiments")
        if self.group.tags is None:
            self.group.tags = list(DEFAULT_GROUP_TAGS[self.kind])
        if self.kind == "generic" and not self.generic.metrics:
            raise ConfigError("config key 'generic.metrics': a generic report must name at least one metric")
        if not 0 <= self.digits <= 12:
            raise ConfigError(f"config key 'digits' must be in [0, 12], got {self.digits}")
        self.targets = [parse_target(target, f"targets[{i}]") for i, target in enumerate(self.targets)]

    def group_tag_defaults(self) -> dict[str, str | None]:
        """Tag name → the value assumed when a run lacks it (None: no default, the run's key says "n/a")."""
        defaults: dict[str, str | None] = {}
        for entry in self.group.tags or []:
            name, sep, value = entry.partition("=")
            defaults[name.strip()] = value.strip() if sep else None
        return defaults


def parse_target(value: Any, where: str = "target") -> Target:
    """A :class:`Target` from its mapping or its string form ``"test/SPIDEr >= 0.50 @ additive xe in T1"``.

    Raises:
        ConfigError: naming ``where``: an unknown key, a bad operator or a threshold that is not a number.
    """
    if isinstance(value, Target):
        return value
    if isinstance(value, Mapping):
        try:
            return config_from_dict(Target, value)
        except ConfigError as err:
            raise ConfigError(f"config key '{where}': {err}") from err
    if isinstance(value, str):
        match = _TARGET.match(value)
        if match:
            try:
                threshold = float(match["threshold"])
            except ValueError:
                threshold = None
            if threshold is not None:
                return Target(match["metric"], match["op"], threshold, match["group"] or "", match["table"] or "")
    raise ConfigError(
        f"config key '{where}': {value!r} is not a target: write 'METRIC OP THRESHOLD [@ GROUP]' "
        "(OP one of >, >=, <, <=; e.g. 'test/SPIDEr >= 0.50 @ additive xe in T1') or a mapping of metric, op, "
        "threshold, group, table"
    )


def load_report_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ReportSpec:
    """Load and validate a report spec from YAML plus ``key=value`` overrides.

    Raises:
        ConfigError: the file is missing or not YAML, or a key is unknown, mistyped or out of range; the message
            names the key and the file (or the override).
    """
    return load_config(ReportSpec, path, overrides)


def spec_sha256(spec: ReportSpec) -> str:
    """sha256 of the spec's canonical JSON (keys sorted): the same spec, the same hash."""
    return hashlib.sha256(json.dumps(config_to_dict(spec), sort_keys=True).encode()).hexdigest()
