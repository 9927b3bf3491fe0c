"""``avlm ave diagnose``: where an evaluated AVE configuration gains or loses against its baseline, from MLflow runs.

Run it::

    avlm ave diagnose --candidate RUN_A0 RUN_A1 RUN_A2 --baseline RUN_U0 RUN_U1 RUN_U2 --split test --out diag/

The i-th candidate run is paired with the i-th baseline run (give them in the same seed order); each run's
``predictions/<split>.json`` is read, and ``diagnose.json`` and ``diagnose.md`` are written to ``--out``. A chain
writes the same files for every stage by itself (``chain/<stage>/diagnose.*`` on the chain run).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from avlm.ave.diagnose import diagnose_runs
from avlm.errors import ConfigError
from avlm.tracking import resolve_tracking_uri
from avlm.tracking.children import SweepRuns


def add_commands(groups: argparse._SubParsersAction) -> None:
    """Register the ``ave`` command group on the ``avlm`` parser."""
    ave = groups.add_parser("ave", help="AVE study chores (diagnose an evaluated configuration)")
    commands = ave.add_subparsers(dest="command", required=True)
    parser = commands.add_parser(
        "diagnose",
        allow_abbrev=False,
        help="diagnose.json / diagnose.md of candidate runs against baseline runs, paired by seed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--candidate", nargs="+", required=True, help="the candidate's run ids, in seed order")
    parser.add_argument("--baseline", nargs="+", required=True, help="the baseline's run ids, in the same order")
    parser.add_argument("--split", default="test", choices=("val", "test"), help="the evaluated split to compare")
    parser.add_argument("--out", type=Path, default=Path("diagnose"), help="folder for diagnose.json and .md")
    parser.add_argument("--tracking_uri", default="", help="empty = MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    parser.set_defaults(handler=diagnose_command)


def diagnose_command(args: argparse.Namespace) -> int:
    """Diagnose the paired runs; print where the report went and its headline figures."""
    if len(args.candidate) != len(args.baseline):
        raise ConfigError(
            f"--candidate has {len(args.candidate)} runs and --baseline {len(args.baseline)}: pair them one to one"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    runs = SweepRuns(resolve_tracking_uri(args.tracking_uri))
    report = diagnose_runs(
        dict(enumerate(args.candidate)),
        dict(enumerate(args.baseline)),
        split=args.split,
        download=runs.download_file,
        folder=args.out,
    )
    if report is None:
        raise ConfigError(f"a run has no predictions/{args.split}.json (was it evaluated on {args.split}?)")
    print(  # noqa: T201
        f"{args.out / 'diagnose.json'}: Δ {report['accuracy']['delta']:+.4f} on {report['clips']} {args.split} "
        f"clips × {len(report['seeds'])} pairs, fallback {report['fallback']['frac']:.3f}"
    )
    return 0
