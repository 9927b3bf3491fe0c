"""Entry point `train_caption`: argv → CaptionConfig → avlm.recipes.caption.main.

python entrypoints/train_caption.py                              # demo sounds, tiny encoder and LM
python entrypoints/train_caption.py --config examples/caption/additive_audiocaps.yaml --data_dir /data/audiocaps
python entrypoints/train_caption.py model.fusion=cross_attention model.fusion_layers=[1,3]   # any config key
accelerate launch --config_file examples/accelerate/ddp_2gpu.yaml entrypoints/train_caption.py --config ...
mlflow run . -e train_caption --env-manager local -P fusion=concat
"""

from __future__ import annotations

import sys

from avlm.cli import run_recipe
from avlm.recipes import caption

# MLproject parameters → config keys. An empty value keeps what the config file says.
SHORTCUTS = {
    "data_dir": "data.data_dir",
    "dataset": "data.dataset",
    "encoder": "model.encoder",
    "lm": "model.lm",
    "fusion": "model.fusion",
    "fusion_layers": "model.fusion_layers",
    "epochs": "train.epochs",
    "seed": "seed",
    "register_as": "registry.name",
    "resume": "resume",
}


def main(argv: list[str] | None = None) -> int:
    return run_recipe(
        prog="train_caption",
        description=__doc__,
        default_config="examples/caption/demo.yaml",
        shortcuts=SHORTCUTS,
        load_config=caption.load_caption_config,
        run=caption.main,
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())
