"""Entry point `train_cvs`: argv → CVSConfig → avlm.recipes.cvs.main.

python entrypoints/train_cvs.py                                  # demo data, tiny backbone
python entrypoints/train_cvs.py --config examples/cvs/vjepa2_lora.yaml --data_dir /data/endoscapes
python entrypoints/train_cvs.py train.epochs=3 model.head_dropout=0.2     # any config key
accelerate launch --config_file examples/accelerate/ddp_2gpu.yaml entrypoints/train_cvs.py --config ...
mlflow run . -e train_cvs --env-manager local -P epochs=3
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from avlm.errors import AvlmError
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="examples/cvs/demo.yaml", help="YAML config (examples/cvs/*.yaml)")
    for name, key in SHORTCUTS.items():
        parser.add_argument(f"--{name}", default="", help=f"sets {key}; empty keeps the config's value")
    parser.add_argument("overrides", nargs="*", help="any config key as key=value, e.g. train.batch_size=8")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    overrides = [f"{key}={getattr(args, name)}" for name, key in SHORTCUTS.items() if getattr(args, name) != ""]
    try:
        cfg = cvs.load_cvs_config(args.config, overrides + args.overrides)
        result = cvs.main(cfg)
    except AvlmError as err:
        print(f"train_cvs: error: {err}", file=sys.stderr)
        return 2
    if rank == 0 and result.run_id:
        print(
            f"\nMLflow run {result.run_id}: best {cfg.train.monitor} = {result.state.best_value:.4f} "
            f"at epoch {result.state.best_epoch}"
        )
        for key, value in sorted(result.final_metrics.items()):
            print(f"  {key} = {value:.4f}")
        if result.model_version:
            verdict = "promoted to champion" if result.promoted else "not promoted (see its promotion.* tags)"
            print(f"Registered {cfg.registry.name} version {result.model_version} (alias candidate), {verdict}.")
        print("Browse it: mlflow ui --backend-store-uri sqlite:///mlflow.db   (then open http://127.0.0.1:5000)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
