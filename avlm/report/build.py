"""Build a report from runs into a folder, and (:func:`run_report`) from MLflow into a ``report`` run's artifacts.

The folder::

    report.md  report.html     every section: text, tables, figures (HTML shows the SVGs)
    summary.json               groups (label, configuration, seeds, run ids), targets and their outcomes
    spec.yaml                  the spec as resolved (defaults filled in)
    tables/<name>.md .html .csv
    figures/<name>.png .svg

Nothing in it depends on the time or the machine: the same runs and spec give byte-equal files.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import yaml

from avlm.config import config_to_dict, flatten_config
from avlm.errors import ConfigError
from avlm.report import ave, captioning, cvs, generic
from avlm.report.context import ReportContext, RunSource, Section
from avlm.report.figures import save_figure
from avlm.report.grouping import CONFIG_PREFIX, RunGroup
from avlm.report.spec import ReportSpec, spec_sha256
from avlm.report.tables import Cell, Table, html_page, render_csv, render_html, render_markdown, text_cell
from avlm.report.targets import TargetOutcome, checklist_section, evaluate_target
from avlm.tracking.run_table import RunRecord

logger = logging.getLogger(__name__)

KIND_SECTIONS = {
    "cvs": cvs.sections,
    "captioning": captioning.sections,
    "generic": generic.sections,
    "ave": ave.sections,
}
REPORT_RECIPE = "report"  # the `recipe` tag of report runs, which reports never read back as runs
MARKER_FILE = "report.md"


@dataclasses.dataclass
class BuiltReport:
    """What :func:`build_report` made.

    Attributes:
        folder: the report folder.
        files: the files written, relative to ``folder``, sorted.
        groups: the groups of the report's runs.
        targets: the checklist's outcomes, in the spec's order.
        left_out: run id → why it was not read as a recipe run.
        tables: every table of the report by name, as built (cells with their text and raw figures).
        run_id: the MLflow ``report`` run holding the folder as artifacts (set by :func:`run_report`).
    """

    folder: Path
    files: list[str]
    groups: list[RunGroup]
    targets: list[TargetOutcome]
    left_out: dict[str, str]
    tables: dict[str, Table]
    run_id: str | None = None


def default_label(spec: ReportSpec) -> list[str] | None:
    """A kind's group label when the spec sets none: captioning rows are "system training"."""
    return [spec.captioning.system, "tags.training"] if spec.kind == "captioning" else None


def select_runs(runs: Sequence[RunRecord]) -> tuple[list[RunRecord], dict[str, str]]:
    """The recipe runs among ``runs``: report runs and runs without ``cfg.*`` params (a sweep's or chain's parent)
    are left out, with the reason."""
    kept, left_out = [], {}
    for run in runs:
        if run.tags.get("recipe") == REPORT_RECIPE:
            left_out[run.run_id] = "a report run"
        elif not any(name.startswith(CONFIG_PREFIX) for name in run.params):
            left_out[run.run_id] = "no cfg.* params (not a recipe run)"
        else:
            kept.append(run)
    return kept, left_out


def _prepare(folder: Path) -> None:
    """An empty folder: a previous report in it is replaced; anything else there is refused."""
    if folder.exists():
        if any(folder.iterdir()) and not (folder / MARKER_FILE).is_file():
            raise ConfigError(f"report folder {folder} exists and holds no {MARKER_FILE}: refusing to replace it")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def build_report(spec: ReportSpec, runs: Sequence[RunRecord], source: RunSource, folder: str | Path) -> BuiltReport:
    """Group the runs, build the kind's sections, the checklist and the run list, and write them to ``folder``.

    Args:
        spec: the report spec.
        runs: the runs found (recipe runs are selected from them, see :func:`select_runs`).
        source: metric histories and JSON artifacts of the runs.
        folder: where to write; replaced if it holds a previous report.

    Raises:
        ConfigError: ``folder`` exists with other contents.
    """
    folder = Path(folder)
    kept, left_out = select_runs(runs)
    context = ReportContext(spec, kept, source, default_label(spec))
    sections = [_overview(context, left_out)]
    sections += KIND_SECTIONS[spec.kind](context)
    if spec.kind != "generic" and spec.generic.metrics:
        sections += generic.sections(context)
    outcomes = [evaluate_target(target, context) for target in spec.targets]
    if outcomes:
        sections.append(checklist_section(outcomes, spec.digits))
    sections.append(_runs_section(context))
    for names in ([t.name for s in sections for t in s.tables], [f.name for s in sections for f in s.figures]):
        if len(set(names)) != len(names):
            raise ConfigError(f"report {spec.name}: two tables or two figures share a name: {sorted(names)}")
    _prepare(folder)
    files = _write(folder, spec, sections, context, outcomes)
    tables = {table.name: table for section in sections for table in section.tables}
    return BuiltReport(folder, sorted(files), context.groups, outcomes, left_out, tables)


def _overview(context: ReportContext, left_out: dict[str, str]) -> Section:
    spec = context.spec
    selection = f"experiment(s) {', '.join(spec.runs.experiments)}"
    selection += f", filter `{spec.runs.filter}`" if spec.runs.filter else ""
    text = [
        f"Kind: {spec.kind}. {len(context.runs)} {'/'.join(spec.runs.statuses)} runs of {selection}, in "
        f"{len(context.groups)} groups.",
        f"A group is a configuration: the cfg.* params except {spec.group.seed_param} and "
        f"{', '.join(spec.group.ignore) or 'none ignored'}"
        + (f", plus the tags {', '.join(_tag_text(entry) for entry in spec.group.tags)}" if spec.group.tags else "")
        + "; its runs are its seeds, one run per seed (a later run of a seed replaces the earlier one).",
        "Over seeds: mean ± std with the sample std (ddof=1).",
    ]
    duplicates = sorted(run_id for group in context.groups for run_id in group.duplicates)
    if duplicates:
        text.append(f"Left out as earlier runs of a seed: {', '.join(duplicates)}.")
    if left_out:
        text.append("Not read as recipe runs: " + ", ".join(f"{k} ({v})" for k, v in sorted(left_out.items())) + ".")
    return Section(f"Report: {spec.name}", text=text)


def _tag_text(entry: str) -> str:
    name, sep, value = entry.partition("=")
    return f"{name} ({value} when a run lacks it)" if sep else name


def _runs_section(context: ReportContext) -> Section:
    table = Table(
        name="runs", title="Runs", columns=["group", "seed", "run", "run id", "experiment", "status"], rows=[]
    )
    for group in context.groups:
        for seed, run in zip(group.seeds, group.runs, strict=True):
            table.rows.append(
                [
                    text_cell(group.label),
                    text_cell(seed),
                    text_cell(run.run_name),
                    Cell(run.run_id),
                    text_cell(run.experiment),
                    text_cell(run.status),
                ]
            )
    return Section("Runs", tables=[table])


def _write(
    folder: Path,
    spec: ReportSpec,
    sections: Sequence[Section],
    context: ReportContext,
    outcomes: Sequence[TargetOutcome],
) -> list[str]:
    files: list[str] = []

    def write(relative: str, text: str) -> None:
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        files.append(relative)

    markdown, body = [], []
    for index, section in enumerate(sections):
        level = 1 if index == 0 else 2
        markdown += [f"{'#' * level} {section.title}", ""]
        body.append(f"<h{level}>{html.escape(section.title)}</h{level}>\n")
        for paragraph in section.text:
            markdown += [paragraph, ""]
            body.append(f"<p>{html.escape(paragraph)}</p>\n")
        for table in section.tables:
            write(f"tables/{table.name}.md", render_markdown(table, level=1))
            write(f"tables/{table.name}.html", html_page(table.title, [render_html(table)]))
            write(f"tables/{table.name}.csv", render_csv(table))
            markdown += [render_markdown(table), f"([CSV](tables/{table.name}.csv))", ""]
            body.append(render_html(table))
        for item in section.figures:
            files += [str(path.relative_to(folder)) for path in save_figure(item.figure, folder / "figures", item.name)]
            markdown += [f"![{item.title}](figures/{item.name}.png)", ""]
            markdown += [f"*{item.caption}*", ""] if item.caption else []
            caption = f"<figcaption>{html.escape(item.caption)}</figcaption>" if item.caption else ""
            body.append(
                f'<figure><img src="figures/{item.name}.svg" alt="{html.escape(item.title)}">{caption}</figure>\n'
            )
    write(MARKER_FILE, "\n".join(markdown).rstrip() + "\n")
    write("report.html", html_page(f"Report: {spec.name}", body))
    write("spec.yaml", yaml.safe_dump(config_to_dict(spec), sort_keys=False, allow_unicode=True))
    summary = {
        "name": spec.name,
        "kind": spec.kind,
        "spec_sha256": spec_sha256(spec),
        "groups": [
            {
                "label": g.label,
                "configuration": dict(g.key),
                "seeds": list(g.seeds),
                "run_ids": [r.run_id for r in g.runs],
                "duplicates": list(g.duplicates),
            }
            for g in context.groups
        ],
        "targets": [o.to_dict() for o in outcomes],
    }
    write("summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return files


def run_report(spec: ReportSpec) -> BuiltReport:
    """Read the spec's runs from MLflow, build the report under ``<output_dir>/<name>``, and log the folder as the
    artifacts of a ``report`` run: ``$MLFLOW_RUN_ID`` when ``mlflow run`` made one, else a new run named
    ``report-<name>`` in ``tracking.experiment`` (default ``avlm-report``).

    The report run is tagged ``recipe=report`` (so no report reads it back as a run), ``report.kind``,
    ``report.spec_sha256``, ``report.runs`` and ``report.targets`` (``met/total``), and logs the spec flat as
    ``spec.*`` params.
    """
    from avlm.tracking import provenance_tags, tracked_run
    from avlm.tracking.run_table import RunReader

    reader = RunReader(spec.tracking.tracking_uri)
    own_run = os.environ.get("MLFLOW_RUN_ID")
    runs = [
        r
        for r in reader.find_runs(spec.runs.experiments, spec.runs.filter, statuses=spec.runs.statuses)
        if r.run_id != own_run
    ]
    built = build_report(spec, runs, reader, Path(spec.output_dir) / spec.name)
    met = sum(outcome.status == "met" for outcome in built.targets)
    with tracked_run(spec.tracking, recipe=REPORT_RECIPE, run_name=f"report-{spec.name}", is_main_process=True) as run:
        run.log_params(flatten_config(spec, prefix="spec."))
        run.set_tags(
            {
                "recipe": REPORT_RECIPE,
                "report.kind": spec.kind,
                "report.spec_sha256": spec_sha256(spec),
                "report.runs": sum(len(g.runs) for g in built.groups),
                "report.targets": f"{met}/{len(built.targets)}",
                **provenance_tags(),
            }
        )
        run.log_artifacts(built.folder)
        built.run_id = run.run_id
    logger.info("report %s: %d files in %s, logged to run %s", spec.name, len(built.files), built.folder, built.run_id)
    return built
