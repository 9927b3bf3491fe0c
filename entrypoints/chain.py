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

from avlm.cli import chain_parser, run_chain_command


def build_parser() -> argparse.ArgumentParser:
    return chain_parser("chain", __doc__, default_spec="examples/chains/cvs_demo.yaml")


def main(argv: list[str] | None = None) -> int:
    return run_chain_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
