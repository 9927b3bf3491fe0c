"""``avlm registry ...``: read the promotion gate's records, and move the champion only through them.

Run it (``python -m avlm registry ...`` until the package is reinstalled with its console script)::

    avlm registry show avlm-cvs            # aliases, stages, each version's last decision
    avlm registry show avlm-cvs 3          # one version: aliases, stage, its gate evidence
    avlm registry history avlm-cvs [3]     # every decision, in the order they were made
    avlm registry promote avlm-cvs 3       # only on a standing passed gate decision; exit 2 otherwise
    avlm registry promote avlm-cvs 3 --force --reason "hot-fix approved by the PI"
    avlm registry check avlm-cvs           # what was moved by hand outside the gate; exit 1 when inconsistent
    avlm registry rollback avlm-cvs        # restore the champion (and family aliases) the records name
    avlm registry rollback avlm-cvs --to 2 --reason "v3 regresses on site B"

Family champions (``champion-lora``, ``champion-frozen``…, ``registry.family_alias``) go through the same gate;
their decisions show with the alias named (``v2 #2 gate champion-lora: promoted``), ``check`` compares them with
their records like the champion, and ``rollback`` restores them; ``promote`` and ``rollback --to`` move the overall
champion only.

Every command takes ``--tracking-uri`` and ``--registry-uri`` (defaults: ``$MLFLOW_TRACKING_URI`` and
``$MLFLOW_REGISTRY_URI``, else ``sqlite:///mlflow.db`` in the working directory, as the recipes use).
"""

from __future__ import annotations

import argparse
from typing import Any

from avlm.errors import ConfigError
from avlm.tracking.mlflow_logger import resolve_tracking_uri
from avlm.tracking.registry import (
    CHAMPION_ALIAS,
    DecisionRecord,
    check_registry,
    decision_history,
    model_versions,
    promote_by_hand,
    rollback,
    standing_decision,
    version_records,
    version_stage,
)


def add_commands(groups: argparse._SubParsersAction) -> None:
    """Register the ``registry`` command group on the ``avlm`` parser."""
    stores = argparse.ArgumentParser(add_help=False)
    stores.add_argument(
        "--tracking-uri",
        default="",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    stores.add_argument(
        "--registry-uri", default="", help="MLflow registry URI (default: $MLFLOW_REGISTRY_URI, else the tracking URI)"
    )
    registry = groups.add_parser("registry", help="the model registry's promotion records (show, promote, check…)")
    commands = registry.add_subparsers(dest="command", required=True)

    def command(name: str, handler: Any, help: str, description: str | None = None) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, parents=[stores], allow_abbrev=False, help=help, description=description)
        parser.add_argument("name", help="registered model name")
        parser.set_defaults(handler=handler)
        return parser

    command("show", show_command, "aliases, stages and gate evidence of a model or one version").add_argument(
        "version", nargs="?"
    )
    command("history", history_command, "every promotion decision, in the order made").add_argument(
        "version", nargs="?"
    )
    promote = command(
        "promote",
        promote_command,
        "make a version champion, only on a standing passed gate decision",
        "Move the champion alias and stage Production to VERSION when it holds a passed gate decision not "
        "superseded since; print that evidence. Refused (exit 2) otherwise, unless --force with a --reason, "
        "recorded on the version with who and when.",
    )
    promote.add_argument("version")
    promote.add_argument("--force", action="store_true", help="promote without a passed gate decision")
    promote.add_argument("--reason", default="", help="why (required with --force)")
    command("check", check_command, "report what was moved by hand outside the gate (exit 1 when inconsistent)")
    back = command(
        "rollback",
        rollback_command,
        "restore the champion the gate's records name (or an earlier one with --to)",
        "Without --to: put the champion alias and stage Production back on the version the gate's records name "
        "(the last decision that promoted, forced or restored a version), undoing moves made by hand. With --to "
        "VERSION --reason: reinstate an earlier champion. Recorded as a decision.",
    )
    back.add_argument("--to", default=None, help="an earlier champion to reinstate")
    back.add_argument("--reason", default="", help="why (required with --to)")


def _connect(args: argparse.Namespace) -> None:
    import mlflow

    mlflow.set_tracking_uri(resolve_tracking_uri(args.tracking_uri))
    if args.registry_uri:  # otherwise MLflow's own default: $MLFLOW_REGISTRY_URI, else the tracking URI
        mlflow.set_registry_uri(args.registry_uri)


def _out(line: str = "") -> None:
    print(line)  # noqa: T201


def record_lines(record: DecisionRecord) -> list[str]:
    """A decision as text: the head line, the rule, each condition with its figure, the values and run ids."""
    passed = "" if record.passed is None else f" (rule {'passed' if record.passed else 'failed'})"
    family = "" if record.alias == CHAMPION_ALIAS else f" {record.alias}"
    lines = [
        f"v{record.version} #{record.index} {record.kind}{family}: {record.decision}{passed} at {record.at or '?'} "
        f"by {record.by or '?'}",
        f"  reason: {record.reason}",
    ]
    if record.champion_before:
        lines.append(f"  {record.alias} then: v{record.champion_before}")
    if record.rule is not None:
        frozen = f", frozen in run {record.rule_frozen_in}" if record.rule_frozen_in else ""
        evaluated = " (not evaluated)" if record.passed is None and record.decision != "evaluating" else ""
        lines.append(f"  rule {record.rule.get('name') or '(unnamed)'} sha256 {record.rule_sha256}{frozen}{evaluated}")
    for condition in record.conditions:
        mark = "PASS" if condition.get("passed") else "FAIL"
        seeds = ",".join(condition.get("seeds") or []) or "-"
        test = f"; {condition['test']} statistic {condition.get('statistic')}" if "test" in condition else ""
        lines.append(f"  [{mark}] {condition.get('condition')}: {condition.get('reason')} (seeds {seeds}{test})")
    values = record.values or {}
    for side in ("candidate", "baseline"):
        if values.get(side):
            label = values.get(f"{side}_label", side)
            for metric, by_seed in values[side].items():
                listed = ", ".join(f"{seed}={value:.6g}" for seed, value in by_seed.items())
                lines.append(f"  {side} {label} {metric}: {listed}")
    if record.candidate_run_ids or record.baseline_run_ids:
        lines.append(
            f"  candidate runs: {', '.join(record.candidate_run_ids) or '-'}; baseline runs: "
            f"{', '.join(record.baseline_run_ids) or '-'}"
        )
    if record.backed_by is not None:
        lines.append(f"  backed by gate decision #{record.backed_by}")
    if record.artifact:
        lines.append(f"  record: {record.artifact}")
    return lines


def show_command(args: argparse.Namespace) -> int:
    """Print a model's aliases and versions, or one version's aliases, stage and gate evidence."""
    from mlflow import MlflowClient

    _connect(args)
    model, versions = MlflowClient().get_registered_model(args.name), model_versions(args.name)
    aliases = {alias: str(version) for alias, version in (model.aliases or {}).items()}
    if args.version is None:
        _out(f"{args.name}: " + (", ".join(f"{a} -> v{v}" for a, v in sorted(aliases.items())) or "no aliases"))
        for version in versions:
            records = version_records(version)
            held = [a for a, v in aliases.items() if v == str(version.version)]
            last = records[-1] if records else None
            summary = f"#{last.index} {last.kind} {last.decision}: {last.reason}" if last else "no decision"
            held_text = ",".join(sorted(held)) or "-"
            _out(f"  v{version.version}  stage {version_stage(version)}  aliases {held_text}  {summary}")
        return 0
    version = next((v for v in versions if str(v.version) == str(args.version)), None)
    if version is None:
        raise ConfigError(f"registered model {args.name!r} has no version {args.version}")
    held = sorted(a for a, v in aliases.items() if v == str(version.version))
    _out(f"{args.name} v{version.version}: stage {version_stage(version)}, aliases {', '.join(held) or '-'}")
    _out(f"  run {version.run_id or '-'}, source {version.source}")
    records = version_records(version)
    standing = standing_decision(decision_history(args.name), str(version.version))
    shown = standing or next((r for r in reversed(records) if r.kind == "gate" and r.alias == CHAMPION_ALIAS), None)
    if shown is None:
        _out("  no gate decision recorded")
    else:
        _out("gate evidence (standing passed decision):" if standing else "gate evidence (last gate decision):")
        for line in record_lines(shown):
            _out(f"  {line}")
    _out(f"{len(records)} decision(s) on this version; see: avlm registry history {args.name} {version.version}")
    return 0


def history_command(args: argparse.Namespace) -> int:
    """Print every decision on the model (or the version), oldest first."""
    _connect(args)
    records = decision_history(args.name, args.version)
    if not records:
        _out(f"no promotion decision recorded on {args.name}" + (f" v{args.version}" if args.version else ""))
    for record in records:
        for line in record_lines(record):
            _out(line)
    return 0


def promote_command(args: argparse.Namespace) -> int:
    """Print the version's gate evidence, then promote it (or refuse: exit 2 through ``PromotionRefused``)."""
    _connect(args)
    standing = standing_decision(decision_history(args.name), str(args.version))
    if standing is not None:
        _out("standing gate decision:")
        for line in record_lines(standing):
            _out(f"  {line}")
    else:
        gates = [r for r in decision_history(args.name, args.version) if r.kind == "gate" and r.alias == CHAMPION_ALIAS]
        _out("no standing passed gate decision" + ("; the last one:" if gates else " (no gate decision at all)"))
        for line in record_lines(gates[-1]) if gates else []:
            _out(f"  {line}")
    record = promote_by_hand(args.name, args.version, force=args.force, reason=args.reason)
    if record is None:
        _out(f"{args.name} v{args.version} already is {CHAMPION_ALIAS} in stage Production; nothing moved")
    else:
        _out(f"{args.name} v{args.version} is {CHAMPION_ALIAS} (decision #{record.index}, {record.decision})")
    return 0


def check_command(args: argparse.Namespace) -> int:
    """Print the registry's state against the gate's records; exit 1 when inconsistent."""
    _connect(args)
    state = check_registry(args.name)
    champion = f"v{state.champion}" if state.champion else "none"
    gate = f"v{state.gate_champion}" if state.gate_champion else "none"
    production = ", ".join(f"v{v}" for v in state.production) or "none"
    _out(f"{args.name}: champion {champion}, by the gate's records {gate}, Production {production}")
    for family in state.families:
        holder = f"v{family.holder}" if family.holder else "none"
        by_records = f"v{family.gate_holder}" if family.gate_holder else "none"
        _out(f"  {family.alias} {holder}, by the gate's records {by_records}")
    for note in state.notes:
        _out(f"  note: {note}")
    for issue in state.issues:
        _out(f"  INCONSISTENT: {issue}")
    if state.consistent:
        _out("  consistent with the gate's records")
        return 0
    _out(f"  restore with: avlm registry rollback {args.name}")
    return 1


def rollback_command(args: argparse.Namespace) -> int:
    """Restore the champion the gate's records name (or ``--to`` an earlier one); print what was done."""
    _connect(args)
    records = rollback(args.name, to=args.to, reason=args.reason)
    if not records:
        _out(f"{args.name} is consistent with the gate's records; nothing to roll back")
    for line in (line for record in records for line in record_lines(record)):
        _out(line)
    return 0
