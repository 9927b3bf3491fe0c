"""Entry point `scst`: fine-tune a registered XE captioner with self-critical sequence training.

mlflow run . -e scst --env-manager local                                  # from models:/avlm-caption@champion
mlflow run . -e scst --env-manager local -P model=models:/avlm-caption/3 -P epochs=5
python entrypoints/scst.py --model <run id> scst.baseline=mean_of_others scst.samples=8   # any config key
accelerate launch --config_file examples/accelerate/ddp_2gpu.yaml entrypoints/scst.py --model ...

The run starts from the parent's config (data, model, decoding), takes the keys given here on top, and registers
its best checkpoint as a new version of the parent's registered model (alias ``scst``, lineage tags).
"""

from __future__ import annotations

import sys

from avlm.cli import run_recipe
from avlm.recipes import caption

# MLproject parameters → config keys. An empty value keeps what the config file (or the parent) says.
SHORTCUTS = {
    "model": "scst.parent",
    "epochs": "train.epochs",
    "lr": "train.lr",
    "samples": "scst.samples",
    "baseline": "scst.baseline",
    "reward": "scst.reward",
    "data_dir": "data.data_dir",
    "seed": "seed",
}


def main(argv: list[str] | None = None) -> int:
    return run_recipe(
        prog="scst",
        description=__doc__,
        default_config="examples/caption/scst_demo.yaml",
        shortcuts=SHORTCUTS,
        load_config=caption.load_scst_config,
        run=caption.main,
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
