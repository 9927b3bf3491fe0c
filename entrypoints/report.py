"""Entry point `report`: argv → ReportSpec → avlm.report.run_report.

python entrypoints/report.py                                             # examples/reports/cvs_experiments.yaml
python entrypoints/report.py --spec examples/reports/caption_tables.yaml runs.filter="tags.dataset = 'clotho'"
mlflow run . -e report --env-manager local -P spec=examples/reports/generic.yaml
"""

from __future__ import annotations

import argparse
import logging
import sys

from avlm.cli import browse_line, unknown_option_message
from avlm.errors import AvlmError
from avlm.report import load_report_spec, run_report
from avlm.tracking import resolve_tracking_uri


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="report", description=__doc__, formatter_class=argparse.RawTextHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--spec", default="examples/reports/cvs_experiments.yaml", help="report spec YAML")
    parser.add_argument("overrides", nargs="*", help="any spec key as key=value, e.g. runs.filter=\"tags.x = 'y'\"")
    args, unknown = parser.parse_known_intermixed_args(argv)
    if unknown:
        print(f"report: error: {unknown_option_message(unknown[0], ['--spec'])}", file=sys.stderr)  # noqa: T201
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        spec = load_report_spec(args.spec, args.overrides)
        built = run_report(spec)
    except AvlmError as err:
        print(f"report: error: {err}", file=sys.stderr)  # noqa: T201
        return 2
    met = sum(outcome.status == "met" for outcome in built.targets)
    lines = [
        f"Report {spec.name}: {sum(len(g.runs) for g in built.groups)} runs in {len(built.groups)} groups, "
        f"{len(built.files)} files in {built.folder}, logged to MLflow run {built.run_id}",
        *(f"  target {o.target.text}: {o.status} ({o.reason})" for o in built.targets),
        *([f"  {met} of {len(built.targets)} targets met"] if built.targets else []),
        browse_line(resolve_tracking_uri(spec.tracking.tracking_uri)),
    ]
    print("\n" + "\n".join(lines))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
