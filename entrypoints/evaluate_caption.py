"""Entry point `evaluate_caption`: argv → EvaluateCaptionConfig → avlm.recipes.evaluate_caption.main.

mlflow run . -e evaluate_caption --env-manager local -P model=models:/avlm-caption@scst -P split=test
python entrypoints/evaluate_caption.py --model models:/avlm-caption/3 --num_beams 1 --rerank true
python entrypoints/evaluate_caption.py --model <run id> --snr_db [20,10,0]          # robustness to white noise
python entrypoints/evaluate_caption.py decoding.rerank.similarity=clap decoding.rerank.clap=hf:<id>   # any key

Decoding starts from the evaluated checkpoint's own; every key given here replaces that key only.
"""

from __future__ import annotations

import sys

from avlm.cli import run_recipe
from avlm.recipes import evaluate_caption

# MLproject parameters → config keys. An empty value keeps what the config file (or the checkpoint) says.
SHORTCUTS = {
    "model": "model",
    "split": "split",
    "snr_db": "snr_db",
    "num_beams": "decoding.num_beams",
    "rerank": "decoding.rerank.enabled",
    "data_dir": "data_dir",
}


def main(argv: list[str] | None = None) -> int:
    return run_recipe(
        prog="evaluate_caption",
        description=__doc__,
        default_config="",
        shortcuts=SHORTCUTS,
        load_config=evaluate_caption.load_evaluate_caption_config,
        run=evaluate_caption.main,
        argv=argv,
        summarize=evaluate_caption.summary_lines,
    )


if __name__ == "__main__":
    sys.exit(main())
