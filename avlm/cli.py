"""What every entry point does: argv → config (file, MLproject shortcuts, ``key=value``) → recipe → summary.

An entry point names its recipe, its default config and its shortcuts (MLproject parameter → config key) and
calls :func:`run_recipe`. Errors the user can fix (``AvlmError``: bad file, key, data) end with one line on
stderr and exit status 2; the MLflow run is already marked FAILED by then.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from avlm.errors import AvlmError


def run_recipe(
    *,
    prog: str,
    description: str,
    default_config: str,
    shortcuts: Mapping[str, str],
    load_config: Callable[[str, Sequence[str]], Any],
    run: Callable[[Any], Any],
    argv: Sequence[str] | None = None,
    summarize: Callable[[Any, Any], list[str]] | None = None,
) -> int:
    """Parse ``argv``, run the recipe, print where its results are (``summarize(cfg, result)``, by default
    :func:`summary_lines`); return the process exit status."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", default=default_config, help="YAML config file")
    for name, key in shortcuts.items():
        parser.add_argument(f"--{name}", default="", help=f"sets {key}; empty keeps the config's value")
    parser.add_argument("overrides", nargs="*", help="any config key as key=value, e.g. train.batch_size=8")
    args = parser.parse_args(argv)

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    overrides = [f"{key}={getattr(args, name)}" for name, key in shortcuts.items() if getattr(args, name) != ""]
    try:
        cfg = load_config(args.config, overrides + list(args.overrides))
        result = run(cfg)
    except AvlmError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)  # noqa: T201
        return 2
    if rank == 0 and result.run_id:
        print("\n" + "\n".join((summarize or summary_lines)(cfg, result)))  # noqa: T201
    return 0


def summary_lines(cfg: Any, result: Any) -> list[str]:
    """The run, its best monitored value, its final metrics, and what the registry decided."""
    monitor = getattr(result, "monitor", cfg.train.monitor)
    lines = [
        f"MLflow run {result.run_id}: best {monitor} = {result.state.best_value:.4f} at epoch {result.state.best_epoch}"
    ]
    lines += [f"  {key} = {value:.4f}" for key, value in sorted(result.final_metrics.items())]
    if result.model_version:
        verdict = "promoted to champion" if result.promoted else "not promoted (see its promotion.* tags)"
        lines.append(f"Registered {cfg.registry.name} version {result.model_version} (alias candidate), {verdict}.")
    lines.append("Browse it: mlflow ui --backend-store-uri sqlite:///mlflow.db   (then open http://127.0.0.1:5000)")
    return lines
