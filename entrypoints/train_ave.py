"""Entry point `train_ave`: argv → AveConfig → avlm.recipes.ave.main (one allocation, one seed).

python entrypoints/train_ave.py                                          # demo data, uniform allocation
python entrypoints/train_ave.py --allocation anchored --eventness oracle --seed 3
python entrypoints/train_ave.py --config examples/ave/demo.yaml allocation.k=1 eval.test=true   # any config key
mlflow run . -e train_ave --env-manager local -P allocation=anchored -P eventness=audio_energy
"""

from __future__ import annotations

import sys

from avlm.cli import run_recipe
from avlm.recipes import ave

# MLproject parameters → config keys. An empty value keeps what the config file says.
SHORTCUTS = {
    "data_dir": "data.data_dir",
    "dataset": "data.dataset",
    "allocation": "allocation.method",
    "eventness": "eventness.method",
    "scores_file": "eventness.scores_file",
    "visual_backbone": "features.visual_backbone",
    "epochs": "train.epochs",
    "seed": "seed",
    "test": "eval.test",
    "resume": "resume",
}


def main(argv: list[str] | None = None) -> int:
    return run_recipe(
        prog="train_ave",
        description=__doc__,
        default_config="examples/ave/demo.yaml",
        shortcuts=SHORTCUTS,
        load_config=ave.load_ave_config,
        run=ave.main,
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
