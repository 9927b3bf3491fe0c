"""avlm.launch, the MLproject commands' launcher: the `accelerate launch` argv it builds for each setup, the config
files it refuses (naming them), every examples/accelerate/*.yaml loaded by accelerate's own loader, and two real
2-process launches at the same time (free ports)."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import launch_command_parser

from avlm import launch
from avlm.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_EXAMPLES = sorted((REPO / "examples/accelerate").glob("*.yaml"))
SCRIPT = ["entrypoints/train_cvs.py", "--config", "tiny.yaml", "--data_dir", "", "train.epochs=2"]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


@pytest.fixture(autouse=True)
def no_default_accelerate_config(monkeypatch, tmp_path):
    """Keep a developer's ~/.cache/huggingface/accelerate/default_config.yaml out of these tests."""
    import accelerate.commands.config.config_args as config_args

    monkeypatch.setattr(config_args, "default_config_file", str(tmp_path / "no_default_config.yaml"))


def accelerate_options(command):
    """The launch options of an `accelerate launch` argv, parsed by accelerate's own parser (so every flag exists)."""
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"], command
    assert command[-len(SCRIPT) :] == SCRIPT  # the entry point's argv passes through unchanged, empty values too
    return launch_command_parser().parse_args(command[3:])


def test_one_process_without_a_config_is_a_plain_python_process():
    assert launch.accelerate_command(SCRIPT, num_processes=1) == [sys.executable, *SCRIPT]


def test_several_processes_use_the_torchrun_launcher_on_a_free_port():
    options = accelerate_options(launch.accelerate_command(SCRIPT, num_processes=2))
    assert options.num_processes == 2 and options.num_machines == 1 and options.multi_gpu
    assert options.main_process_port == 0  # accelerate picks a free port, not 29500 shared by every launch
    assert options.config_file is None and not options.cpu  # --cpu would make accelerate start a single process


def test_an_empty_accelerate_config_is_never_passed_as_config_file(monkeypatch):
    """The MLproject form: `--accelerate_config ''` (an empty parameter) → no --config_file at all."""
    executed = []
    monkeypatch.setattr(launch.os, "execv", lambda path, argv: executed.append(argv))
    launch.main(["--num_processes", "2", "--accelerate_config", "", "--", *SCRIPT])
    (command,) = executed
    assert "--config_file" not in command and accelerate_options(command).multi_gpu


@pytest.mark.parametrize("num_processes", [1, 3])
def test_a_config_file_sets_the_distribution_and_num_processes_wins(num_processes):
    config = str(REPO / "examples/accelerate/cpu_2proc.yaml")
    options = accelerate_options(
        launch.accelerate_command(SCRIPT, num_processes=num_processes, accelerate_config=config)
    )
    assert options.config_file == config and options.num_processes == num_processes
    assert not options.multi_gpu  # the file's distributed_type decides, as with `accelerate launch --config_file`
    assert options.main_process_port == (0 if num_processes > 1 else None)


def test_a_config_file_with_its_own_port_keeps_it():
    config = str(REPO / "examples/accelerate/multinode_ddp.yaml")  # several machines must agree on one port
    options = accelerate_options(launch.accelerate_command(SCRIPT, num_processes=16, accelerate_config=config))
    assert options.main_process_port is None and load_config_from_file(config).main_process_port == 29500


def test_accelerates_default_config_is_used_when_none_is_given(monkeypatch, tmp_path):
    import accelerate.commands.config.config_args as config_args

    default = tmp_path / "default_config.yaml"
    default.write_text((REPO / "examples/accelerate/cpu_2proc.yaml").read_text())
    monkeypatch.setattr(config_args, "default_config_file", str(default))
    options = accelerate_options(launch.accelerate_command(SCRIPT, num_processes=1))
    assert options.config_file == str(default)


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("fault", ["missing", "not_yaml", "unknown_key", "multi_cpu", "deepspeed_missing"])
def test_a_bad_accelerate_config_is_refused_naming_the_file(fault, tmp_path):
    if fault == "missing":
        config, expected = str(tmp_path / "nope.yaml"), "does not exist"
    elif fault == "not_yaml":
        config, expected = (
            write(tmp_path / "bad.yaml", "distributed_type: [MULTI_GPU\n"),
            "not a valid accelerate config",
        )
    elif fault == "unknown_key":
        config, expected = write(tmp_path / "bad.yaml", "distributed_type: MULTI_GPU\nnum_procs: 2\n"), "num_procs"
    elif fault == "multi_cpu":
        # accelerate's MULTI_CPU without MPI starts ONE process: the cpu_2proc.yaml this repo shipped did that
        config = write(tmp_path / "cpu.yaml", "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\n")
        expected = "MULTI_CPU starts a single process"
    else:
        if HAS_DEEPSPEED:
            pytest.skip("deepspeed is installed here")
        config, expected = str(REPO / "examples/accelerate/deepspeed_zero2.yaml"), 'pip install -e ".[deepspeed]"'
    with pytest.raises(ConfigError) as raised:
        launch.accelerate_command(SCRIPT, num_processes=2, accelerate_config=config)
    assert config in str(raised.value) and expected in str(raised.value)


@pytest.mark.parametrize("value", ["0", "-1", "2.5", "two"])
def test_a_bad_num_processes_exits_2_naming_the_option(value, capsys):
    with pytest.raises(SystemExit) as exited:
        launch.main(["--num_processes", value, "--", *SCRIPT])
    assert exited.value.code == 2
    assert (
        f"argument --num_processes: expected a whole number of processes >= 1, got {value!r}" in capsys.readouterr().err
    )


def test_num_processes_as_mlflow_renders_a_float_parameter():
    assert launch.process_count("2") == launch.process_count("2.0") == 2


def test_abbreviated_launcher_options_are_refused(capsys):
    with pytest.raises(SystemExit):
        launch.main(["--num_proc", "2", "--", *SCRIPT])
    assert "unrecognized arguments: --num_proc" in capsys.readouterr().err


def transformers_model_classes():
    """Class names in transformers' modeling files, read as text (importing them all would take minutes)."""
    models = Path(importlib.util.find_spec("transformers").origin).parent / "models"
    return {
        name
        for file in models.glob("*/modeling_*.py")
        for name in re.findall(r"^class (\w+)\(", file.read_text(), re.M)
    }


@pytest.mark.parametrize("path", ACCELERATE_EXAMPLES, ids=lambda p: p.name)
def test_every_accelerate_example_loads_and_says_where_it_runs(path):
    settings = load_config_from_file(str(path))  # accelerate's own loader: unknown keys, bad types and enums fail
    header = path.read_text().splitlines()
    assert re.match(rf"# accelerate launch --config_file examples/accelerate/{path.name} .*entrypoints/", header[0])
    assert header[1].startswith("# Runs on: "), f"{path.name} must say what hardware it needs on its second line"
    # FSDP wraps modules by class name; a name no model defines would wrap nothing, and shard nothing
    for layer_class in filter(
        None, (settings.fsdp_config or {}).get("fsdp_transformer_layer_cls_to_wrap", "").split(",")
    ):
        assert layer_class in transformers_model_classes(), f"{path.name}: no transformers class {layer_class}"
    if settings.distributed_type.value == "DEEPSPEED" and not HAS_DEEPSPEED:
        with pytest.raises(ConfigError, match="DeepSpeed is not installed"):
            launch.accelerate_command(SCRIPT, num_processes=settings.num_processes, accelerate_config=str(path))
        return
    options = accelerate_options(
        launch.accelerate_command(SCRIPT, num_processes=settings.num_processes, accelerate_config=str(path))
    )
    assert options.config_file == str(path) and options.num_processes == settings.num_processes


RANK_SCRIPT = """
import json, os, sys
from avlm.train.loop import distributed_state

state = distributed_state()
out = os.path.join(sys.argv[1], f"rank{state.process_index}.json")
with open(out, "w") as f:
    port = os.environ["MASTER_PORT"]
    json.dump({"world": state.num_processes, "type": state.distributed_type.value, "port": port}, f)
"""


@pytest.mark.slow
def test_two_launches_at_once_each_start_two_processes_on_their_own_port(tmp_path):
    """What two `mlflow run -P num_processes=2` on one machine do: no launch may take the other's port, and
    both the no-config path and cpu_2proc.yaml must really start 2 processes (gloo on this CPU machine)."""
    script = Path(write(tmp_path / "ranks.py", RANK_SCRIPT))
    launches = {"no_config": [], "cpu_2proc": ["--accelerate_config", str(REPO / "examples/accelerate/cpu_2proc.yaml")]}
    processes = {}
    for name, options in launches.items():
        (tmp_path / name).mkdir()
        command = [sys.executable, "-m", "avlm.launch", "--num_processes", "2", *options, "--", str(script)]
        processes[name] = subprocess.Popen(
            [*command, str(tmp_path / name)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    try:
        outputs = {name: process.communicate(timeout=240)[0] for name, process in processes.items()}
    finally:
        for process in processes.values():
            process.kill()
    ranks = {}
    for name, process in processes.items():
        assert process.returncode == 0, outputs[name][-3000:]
        ranks[name] = [json.loads((tmp_path / name / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert all(r["world"] == 2 and r["type"] == "MULTI_CPU" for r in ranks[name]), ranks[name]
    assert ranks["no_config"][0]["port"] != ranks["cpu_2proc"][0]["port"]
