"""Entry point `train_cvs`: argv → CVSConfig → avlm.recipes.cvs.main.

python entrypoints/train_cvs.py                                  # demo data, tiny backbone
python entrypoints/train_cvs.py --config examples/cvs/vjepa2_lora.yaml --data_dir /data/endoscapes
python entrypoints/train_cvs.py train.epochs=3 model.head_dropout=0.2     # any config key
accelerate launch --config_file examples/accelerate/ddp_2gpu.yaml entrypoints/train_cvs.py --config ...
mlflow run . -e train_cvs --env-manager local -P epochs=3
"""

from __future__ import annotations

import sys

from avlm.cli import run_recipe
from avlm.recipes import cvs

# MLproject parameters → config keys. An empty value keeps what the config file says.
SHORTCUTS = {
    "data_dir": "data.data_dir",
    "backbone": "model.backbone",
    "adaptation": "model.adaptation",
    "epochs": "train.epochs",
    "lr": "train.lr",
    "lora_r": "model.lora_r",
    "seed": "seed",
    "register_as": "registry.name",
    "resume": "resume",
}


def main(argv: list[str] | None = None) -> int:
    return run_recipe(
        prog="train_cvs",
        description=__doc__,
        default_config="examples/cvs/demo.yaml",
        shortcuts=SHORTCUTS,
        load_config=cvs.load_cvs_config,
        run=cvs.main,
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
