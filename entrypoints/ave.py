"""Entry point `ave`: the AVE study's pre-registered promotion chain (anchored vs uniform token allocation).

python entrypoints/ave.py                                           # the demo chain, examples/ave/demo_chain.yaml
python entrypoints/ave.py --spec examples/ave/ave_official_chain.yaml --workers 4
mlflow run . -e ave --env-manager local

Val sweep (seeds 0-2) → quick test (seeds 0-2) → full test (seeds 0-9), each stage's runs paired by seed with the
uniform baseline; every stage is diagnosed (diagnose.json / diagnose.md on the stage run and the chain run). Exit
status as for `chain`: 0 a verdict (PASSED, or STOPPED at a stage), 2 a bad spec, the stop rule, or a failed run.
"""

from __future__ import annotations

import argparse
import sys

from avlm.cli import chain_parser, run_chain_command


def build_parser() -> argparse.ArgumentParser:
    return chain_parser("ave", __doc__, default_spec="examples/ave/demo_chain.yaml")


def main(argv: list[str] | None = None) -> int:
    return run_chain_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
