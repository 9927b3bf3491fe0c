"""The ``avlm`` command (``python -m avlm`` until the package is reinstalled with its console script)::

avlm tracking replay <run folder>
avlm registry show|history|promote|check|rollback NAME ...
avlm ave diagnose --candidate RUN ... --baseline RUN ... [--split test] [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from avlm.ave import cli as ave_cli
from avlm.errors import AvlmError
from avlm.tracking import cli as tracking_cli
from avlm.tracking import registry_cli


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the command; return the exit status (2 with a one-line message on an ``AvlmError``)."""
    parser = argparse.ArgumentParser(prog="avlm", allow_abbrev=False)
    groups = parser.add_subparsers(dest="group", required=True)
    tracking_cli.add_commands(groups)
    registry_cli.add_commands(groups)
    ave_cli.add_commands(groups)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except AvlmError as err:
        print(f"avlm: error: {err}", file=sys.stderr)  # noqa: T201
        return 2


if __name__ == "__main__":
    sys.exit(main())
