"""Entry point `sweep`: argv → SweepSpec → avlm.protocol.sweep.run_sweep → the summary.

python entrypoints/sweep.py --spec examples/sweeps/cvs_demo.yaml --workers 2
mlflow run . -e sweep --env-manager local -P spec=examples/sweeps/cvs_demo.yaml -P workers=2
python entrypoints/sweep.py --spec ... --workers 4 --storage postgresql://user:pass@db/optuna   # on every machine

Re-running the same command resumes: (cell, seed) runs already FINISHED are skipped, failed ones run again.
Exit status: 0 done (children that failed are listed, and retried by the next run); 2 a bad spec, cell override,
storage or option; 130/143 interrupted (the running children are stopped and queued again).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from avlm.cli import browse_line
from avlm.errors import AvlmError, RunInterrupted
from avlm.launch import process_count
from avlm.protocol.sweep import load_sweep_spec, run_sweep, summary_lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sweep", description=__doc__, formatter_class=argparse.RawTextHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--spec", default="examples/sweeps/cvs_demo.yaml", help="sweep spec YAML")
    parser.add_argument("--workers", type=process_count, default=1, help="children run at once on this machine")
    parser.add_argument("--storage", default="", help="Optuna storage URL; empty = optuna.db beside the MLflow store")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        spec = load_sweep_spec(args.spec)
        result = run_sweep(spec, workers=args.workers, storage=args.storage)
    except AvlmError as err:
        print(f"sweep: error: {err}", file=sys.stderr)  # noqa: T201
        return 2
    except RunInterrupted as err:
        print(f"sweep: {err}", file=sys.stderr)  # noqa: T201
        return 128 + err.signum
    except KeyboardInterrupt:
        print("sweep: interrupted by SIGINT", file=sys.stderr)  # noqa: T201
        return 128 + signal.SIGINT
    from avlm.tracking import resolve_tracking_uri

    print("\n" + "\n".join([*summary_lines(spec, result), browse_line(resolve_tracking_uri())]))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
