"""What every entry point does: argv → config (file, MLproject shortcuts, ``key=value``) → recipe → summary.

An entry point names its recipe, its default config and its shortcuts (MLproject parameter → config key) and
calls :func:`run_recipe`. Errors the user can fix (an unknown or abbreviated option, ``AvlmError``: bad file,
key, data) end with one line on stderr and exit status 2; the MLflow run is already marked FAILED by then. SIGINT
and SIGTERM end with one line and exit status 128 + the signal's number (130, 143), as a shell reports them.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import signal
import sys
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from avlm.errors import AvlmError, RunInterrupted
from avlm.tracking import resolve_tracking_uri


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
    :func:`summary_lines`, then :func:`browse_line`); return the process exit status.

    Exit status: 0 done; 2 an error the user can fix (bad option, file, key or data); 128 + the signal's number
    when SIGINT or SIGTERM stopped the training (130 for a plain Ctrl-C).
    """
    # No abbreviations: `mlflow run -P epoch=3` passes `--epoch 3`, which argparse would read as --epochs.
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawTextHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--config", default=default_config, help="YAML config file")
    for name, key in shortcuts.items():
        parser.add_argument(f"--{name}", default="", help=f"sets {key}; empty keeps the config's value")
    parser.add_argument("overrides", nargs="*", help="any config key as key=value, e.g. train.batch_size=8")
    args, unknown = parser.parse_known_intermixed_args(argv)
    if unknown:
        valid = ["--config", *(f"--{name}" for name in shortcuts)]
        return _fail(prog, f"error: {unknown_option_message(unknown[0], valid)}", 2)

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
        return _fail(prog, f"error: {err}", 2)
    except RunInterrupted as err:  # SIGTERM or SIGINT during a training (tracking has closed the run KILLED)
        return _fail(prog, str(err), 128 + err.signum)
    except KeyboardInterrupt:  # a Ctrl-C before the training's handlers were installed
        return _fail(prog, "interrupted by SIGINT", 128 + signal.SIGINT)
    if rank == 0 and result.run_id:
        lines = (summarize or summary_lines)(cfg, result)
        print("\n" + "\n".join([*lines, browse_line(resolve_tracking_uri(cfg.tracking.tracking_uri))]))  # noqa: T201
    return 0


def _fail(prog: str, message: str, status: int) -> int:
    print(f"{prog}: {message}", file=sys.stderr)  # noqa: T201
    return status


def run_protocol_command(prog: str, call: Callable[[], Any], report: Callable[[Any], list[str]]) -> int:
    """What a protocol entry point (a sweep, a chain: many runs from one spec) does around its one call: log at INFO,
    run ``call()``, print ``report(result)`` and where to browse the runs; return the exit status.

    Exit status: 0 done; 2 an error the user can act on (:class:`~avlm.errors.AvlmError`: a bad spec, key, storage,
    a refusal), with one line on stderr; 128 + the signal's number on SIGINT or SIGTERM.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = call()
    except AvlmError as err:
        return _fail(prog, f"error: {err}", 2)
    except RunInterrupted as err:
        return _fail(prog, str(err), 128 + err.signum)
    except KeyboardInterrupt:
        return _fail(prog, "interrupted by SIGINT", 128 + signal.SIGINT)
    print("\n" + "\n".join([*report(result), browse_line(resolve_tracking_uri())]))  # noqa: T201
    return 0


def chain_parser(prog: str, description: str, default_spec: str) -> argparse.ArgumentParser:
    """The options of the ``chain`` and ``ave`` entry points: ``--spec`` (a chain spec YAML), ``--workers``,
    ``--storage``."""
    from avlm.launch import process_count

    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawTextHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--spec", default=default_spec, help="chain spec YAML")
    parser.add_argument("--workers", type=process_count, default=1, help="children each stage runs at once")
    parser.add_argument("--storage", default="", help="Optuna storage URL; empty = optuna.db beside the MLflow store")
    return parser


def run_chain_command(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse ``argv`` with :func:`chain_parser`'s ``parser``, run the chain, print its one verdict line (see
    entrypoints/chain.py for the exit statuses)."""
    from avlm.protocol.chain import load_chain_spec, run_chain

    args = parser.parse_args(argv)
    return run_protocol_command(
        parser.prog,
        lambda: run_chain(load_chain_spec(args.spec), workers=args.workers, storage=args.storage),
        lambda result: [result.verdict()],
    )


def unknown_option_message(given: str, valid: Sequence[str]) -> str:
    """Why ``given`` (``--epoch`` or ``--epoch=3``) is refused: the closest valid option, then all of them."""
    name = given.split("=", 1)[0]
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"unknown option '{name}' ({hint}valid options: {', '.join(valid)}; any config key as key=value)"


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
    return lines


def browse_line(tracking_uri: str) -> str:
    """How to look at the runs in ``tracking_uri`` (the URI the run was logged to), its password hidden."""
    parts = urllib.parse.urlsplit(tracking_uri)
    if parts.password:
        hidden = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        tracking_uri = urllib.parse.urlunsplit(parts._replace(netloc=hidden))
    if parts.scheme in ("http", "https"):
        return f"Browse it: open {tracking_uri} in a browser"
    return f"Browse it: mlflow ui --backend-store-uri {tracking_uri}   (then open http://127.0.0.1:5000)"
