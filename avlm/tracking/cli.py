"""``avlm tracking ...``: tracking chores done after a training, e.g. delivering what an outage left behind.

Run it::

    avlm tracking replay outputs/cvs-vjepa2-tiny-frozen-seed1-0123abcd     # or: python -m avlm tracking replay ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

from avlm.tracking.outbox import find_outboxes, replay


def add_commands(groups: argparse._SubParsersAction) -> None:
    """Register the ``tracking`` command group on the ``avlm`` parser."""
    tracking = groups.add_parser("tracking", help="tracking chores (replay what an outage left behind)")
    commands = tracking.add_subparsers(dest="command", required=True)
    replay_parser = commands.add_parser(
        "replay",
        allow_abbrev=False,
        help="deliver the metrics, params, tags, artifacts and final status a run could not deliver",
        description="Deliver what a run left in <run folder>/tracking/ because its tracking server was away "
        "(its own and its nested runs'), then set the status the run ended with. Safe to run twice: nothing is "
        "written twice.",
    )
    replay_parser.add_argument("run_folder", type=Path, help="the run's output folder")
    replay_parser.set_defaults(handler=replay_command)


def replay_command(args: argparse.Namespace) -> int:
    """Replay every pending outbox under ``args.run_folder``; print one line per run."""
    outboxes = find_outboxes(args.run_folder)
    if not outboxes:
        print(f"nothing pending in {args.run_folder}")  # noqa: T201
    for outbox in outboxes:
        report = replay(outbox.parent)
        status = f", status set to {report.status}" if report.status else ", no final status recorded"
        print(  # noqa: T201
            f"run {report.run_id}: {report.points_sent} metric points delivered "
            f"({report.points_already_there} were there already), {report.entries} writes in all{status}"
        )
    return 0
