"""Entry point `chain`: argv → ChainSpec → avlm.protocol.chain.run_chain → a one-line verdict.

python entrypoints/chain.py --spec examples/chains/cvs_demo.yaml --workers 2
mlflow run . -e chain --env-manager local -P spec=examples/chains/cvs_demo.yaml -P workers=2

Re-running the same spec continues the same chain (finished runs are kept, failed ones run again).
Exit status: 0 the chain reached a verdict, PASSED or STOPPED at a stage whose rule failed (the verdict line says
which); 2 a bad spec or option, the stop rule refused a new idea, or a stage could not be decided (a run failed);
130/143 interrupted.
"""

from __future__ import annotations

import argparse
import sys

from avlm.cli import run_protocol_command
from avlm.launch import process_count
from avlm.protocol.chain import load_chain_spec, run_chain


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chain", description=__doc__, formatter_class=argparse.RawTextHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--spec", default="examples/chains/cvs_demo.yaml", help="chain spec YAML")
    parser.add_argument("--workers", type=process_count, default=1, help="children each stage runs at once")
    parser.add_argument("--storage", default="", help="Optuna storage URL; empty = optuna.db beside the MLflow store")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_protocol_command(
        "chain",
        lambda: run_chain(load_chain_spec(args.spec), workers=args.workers, storage=args.storage),
        lambda result: [result.verdict()],
    )


if __name__ == "__main__":
    sys.exit(main())
