"""Run an entry point under ``accelerate launch``: what the MLproject commands call.

python -m avlm.launch --num_processes 2 -- entrypoints/train_cvs.py --config examples/cvs/demo.yaml
python -m avlm.launch --num_processes 4 --accelerate_config examples/accelerate/fsdp.yaml -- entrypoints/train_cvs.py
mlflow run . -e train_cvs --env-manager local -P num_processes=2     # the same, into one MLflow run

MLproject cannot leave an option out when its parameter is empty, so this builds the ``accelerate launch``
command (an empty ``--accelerate_config`` means none, never ``--config_file ""``), prints it and execs it.
Without a config file the processes run on this machine, and one process is a plain ``python`` process;
``--num_processes`` always wins over a config file's value, as accelerate's own flags do.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from avlm.errors import ConfigError

if TYPE_CHECKING:
    from accelerate.commands.config.config_args import BaseConfig

# What a single-machine launch without a config file would otherwise fill in with a warning; the recipe's own
# config sets mixed precision (Accelerator(mixed_precision=...) wins over the launcher's environment).
_QUIET_DEFAULTS = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def process_count(text: str) -> int:
    """``num_processes`` as MLproject passes it (a float parameter: "2" or "2.0"); a whole number ≥ 1."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value.is_integer() or value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of processes >= 1, got {text!r}")
    return int(value)


def accelerate_command(script_and_args: Sequence[str], *, num_processes: int, accelerate_config: str = "") -> list[str]:
    """The ``accelerate launch`` argv that runs ``script_and_args`` in ``num_processes`` processes.

    Args:
        script_and_args: the entry point script followed by its own arguments, passed through unchanged.
        num_processes: processes in all; overrides the config file's ``num_processes``.
        accelerate_config: an accelerate config file (e.g. ``examples/accelerate/fsdp.yaml``); empty uses
            accelerate's default config (written by ``accelerate config``) if there is one, else this machine.

    Raises:
        ConfigError: the config file is missing or unreadable, or it would silently start fewer processes.
    """
    from accelerate.commands.config.config_args import default_config_file

    if not script_and_args:
        raise ConfigError("no entry point to launch: give it after '--', e.g. -- entrypoints/train_cvs.py")
    config_file = accelerate_config or (default_config_file if os.path.isfile(default_config_file) else "")
    if not config_file and num_processes == 1:
        return [sys.executable, *script_and_args]  # a plain process: nothing to set up, and its exit status kept
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    if config_file:
        command += ["--config_file", config_file]
        settings = _load_accelerate_config(config_file)
        distributed_type = settings.distributed_type.value
        if distributed_type == "MULTI_CPU" and num_processes > 1 and not settings.mpirun_config.get("mpirun_hostfile"):
            # accelerate's MULTI_CPU launcher starts ONE process unless MPI runs it (measured with accelerate 1.15)
            raise ConfigError(
                f"{config_file}: distributed_type MULTI_CPU starts a single process without mpirun_hostfile; "
                "use MULTI_GPU (torchrun; on a machine without GPUs the processes use gloo on the CPU), "
                "as examples/accelerate/cpu_2proc.yaml does"
            )
        _check_the_machine_can_run(config_file, distributed_type)
        needs_port = num_processes > 1 and settings.num_machines <= 1 and settings.main_process_port is None
    else:
        # --multi_gpu is accelerate's torchrun launcher; without GPUs avlm.train sets up gloo on the CPU.
        command += [*_QUIET_DEFAULTS, "--multi_gpu"]
        needs_port = True
    if needs_port:
        # 0 = a free port accelerate picks: two launches on one machine (tests, sweeps) never share 29500.
        command += ["--main_process_port", "0"]
    return [*command, *script_and_args]


def _check_the_machine_can_run(config_file: str, distributed_type: str) -> None:
    """Refuse DeepSpeed without its package; say so when FSDP will not be what runs (no GPU)."""
    import importlib.util

    import torch

    if distributed_type == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f'{config_file}: DeepSpeed is not installed (pip install -e ".[deepspeed]"; it needs CUDA)')
    if distributed_type == "FSDP" and not torch.cuda.is_available():
        # avlm.train asks accelerate for gloo on the CPU, and accelerate then drops the FSDP plugin without a word
        print(  # noqa: T201
            f"avlm.launch: warning: {config_file} asks for FSDP, but there is no GPU here: "
            "the processes run plain DDP on the CPU",
            file=sys.stderr,
        )


def _load_accelerate_config(path: str) -> BaseConfig:
    from accelerate.commands.config.config_args import load_config_from_file

    if not Path(path).is_file():
        raise ConfigError(f"accelerate config {path!r} does not exist (see examples/accelerate/)")
    try:
        return load_config_from_file(path)
    except Exception as err:  # accelerate raises bare KeyError/TypeError/yaml errors on a malformed file
        raise ConfigError(f"{path}: not a valid accelerate config: {type(err).__name__}: {err}") from err


def build_parser() -> argparse.ArgumentParser:
    """The launcher's options (the MLproject parameters it takes), then ``--`` and the entry point's argv."""
    parser = argparse.ArgumentParser(
        prog="avlm.launch", description=__doc__, formatter_class=argparse.RawTextHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--num_processes", type=process_count, default=1, help="processes in all (default 1)")
    parser.add_argument("--accelerate_config", default="", help="accelerate config file; empty = none")
    parser.add_argument("command", nargs="+", help="-- the entry point script and its arguments")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the launcher's options, then exec ``accelerate launch`` (never returns); 2 on a bad config file."""
    args = build_parser().parse_args(argv)
    try:
        command = accelerate_command(
            args.command, num_processes=args.num_processes, accelerate_config=args.accelerate_config
        )
    except ConfigError as err:
        print(f"avlm.launch: error: {err}", file=sys.stderr)  # noqa: T201
        return 2
    print(f"avlm.launch: {shlex.join(command)}", file=sys.stderr, flush=True)  # noqa: T201
    os.execv(command[0], command)  # the launcher's own process becomes accelerate's: signals reach it directly


if __name__ == "__main__":
    sys.exit(main())
