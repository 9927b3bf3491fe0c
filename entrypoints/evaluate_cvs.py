"""Entry point `evaluate_cvs`: argv → EvaluateCVSConfig → avlm.recipes.evaluate_cvs.main.

mlflow run . -e evaluate_cvs --env-manager local -P config=examples/cvs/ensemble_demo.yaml
python entrypoints/evaluate_cvs.py --members [models:/avlm-cvs/1,models:/avlm-cvs/2] --split test
python entrypoints/evaluate_cvs.py --members [models:/avlm-cvs@champion,<run id>] --data_dir /data/endoscapes
python entrypoints/evaluate_cvs.py --config examples/cvs/ensemble_demo.yaml batch_size=4     # any key

Each member is evaluated with its own checkpoint's preprocessing and TTA; the ensemble averages their probabilities.
"""

from __future__ import annotations

import sys

from avlm.cli import run_recipe
from avlm.recipes import evaluate_cvs

# MLproject parameters → config keys. An empty value keeps what the config file says.
SHORTCUTS = {
    "members": "members",
    "split": "split",
    "data_dir": "data.data_dir",
}


def main(argv: list[str] | None = None) -> int:
    return run_recipe(
        prog="evaluate_cvs",
        description=__doc__,
        default_config="",
        shortcuts=SHORTCUTS,
        load_config=evaluate_cvs.load_evaluate_cvs_config,
        run=evaluate_cvs.main,
        argv=argv,
        summarize=evaluate_cvs.summary_lines,
    )


if __name__ == "__main__":
    sys.exit(main())
