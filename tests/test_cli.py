"""The entry points' shared front end, through a fake recipe: which options it refuses, what an error names, what
the closing lines say, and the exit status of an interrupted run."""

import dataclasses
import signal

import pytest

from avlm.cli import run_recipe
from avlm.config import load_config
from avlm.errors import RunInterrupted
from avlm.tracking import TrackingConfig


@dataclasses.dataclass
class FakeTrain:
    epochs: int = 1
    lr: float = 0.1


@dataclasses.dataclass
class FakeConfig:
    seed: int = 1
    train: FakeTrain = dataclasses.field(default_factory=FakeTrain)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)


@dataclasses.dataclass
class FakeResult:
    run_id: str = "0123456789abcdef0123456789abcdef"


SHORTCUTS = {"epochs": "train.epochs", "lr": "train.lr", "seed": "seed"}


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "fake.yaml"
    path.write_text("train:\n  epochs: 2\n")
    return path


def fake_main(argv, run=None):
    """Run the fake recipe on ``argv``; return (exit status, the configs it ran with)."""
    ran = []

    def record(cfg):
        ran.append(cfg)
        return FakeResult()

    status = run_recipe(
        prog="fake",
        description="a fake recipe",
        default_config="",
        shortcuts=SHORTCUTS,
        load_config=lambda path, overrides: load_config(FakeConfig, path, overrides),
        run=run or record,
        argv=argv,
        summarize=lambda cfg, result: [f"MLflow run {result.run_id}"],
    )
    return status, ran


@pytest.mark.parametrize("argv", [["--epoch", "3"], ["--epoch=3"], ["--ep", "3", "seed=2"]])
def test_an_abbreviated_or_unknown_option_is_refused_with_the_valid_ones(argv, capsys):
    status, ran = fake_main(argv)
    assert status == 2 and ran == []  # nothing ran (before: --epoch trained with epochs=3)
    err = capsys.readouterr().err.strip()
    name = argv[0].split("=")[0]
    assert err == (
        f"fake: error: unknown option '{name}' (did you mean --epochs? valid options: --config, --epochs, --lr, "
        "--seed; any config key as key=value)"
    )


def test_options_and_key_value_overrides_may_come_in_any_order(config_file):
    status, (cfg,) = fake_main(["seed=4", "--config", str(config_file), "--lr", "0.5", "train.epochs=7"])
    assert status == 0 and (cfg.seed, cfg.train.lr, cfg.train.epochs) == (4, 0.5, 7)
    status, (cfg,) = fake_main(["--config", str(config_file), "--epochs", ""])  # empty keeps the file's value
    assert status == 0 and cfg.train.epochs == 2


def test_an_error_in_an_override_names_the_override_and_one_in_the_file_names_the_file(config_file, capsys):
    assert fake_main(["--config", str(config_file), "--lr", "nan"]) == (2, [])
    err = capsys.readouterr().err
    assert (
        err == "fake: error: config key 'train.lr': expected a finite number, got 'nan' [in override 'train.lr=nan']\n"
    )
    config_file.write_text("train:\n  epochs: -1.5\n")
    assert fake_main(["--config", str(config_file), "seed=3"]) == (2, [])
    err = capsys.readouterr().err
    assert err == f"fake: error: config key 'train.epochs': expected an integer, got -1.5 [in {config_file}]\n"


@pytest.mark.parametrize(
    "env_uri, configured, expected",
    [
        ("http://127.0.0.1:5123", "", "Browse it: open http://127.0.0.1:5123 in a browser"),
        ("sqlite:////data/team.db", "", "Browse it: mlflow ui --backend-store-uri sqlite:////data/team.db"),
        ("sqlite:////data/team.db", "https://mlflow.example.org", "Browse it: open https://mlflow.example.org in"),
        ("postgresql://avlm:s3cret@db:5432/mlflow", "", "--backend-store-uri postgresql://avlm:***@db:5432/mlflow"),
    ],
)
def test_the_summary_names_the_tracking_uri_the_run_used(env_uri, configured, expected, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env_uri)
    assert fake_main([f"tracking.tracking_uri={configured}"] if configured else [])[0] == 0
    out = capsys.readouterr().out
    assert out.startswith("\nMLflow run 0123456789abcdef0123456789abcdef\n") and expected in out, out
    assert "sqlite:///mlflow.db" not in out and "s3cret" not in out


@pytest.mark.parametrize(
    "interrupt, status, message",
    [
        (RunInterrupted(signal.SIGTERM), 143, "fake: interrupted by SIGTERM\n"),
        (RunInterrupted(signal.SIGINT), 130, "fake: interrupted by SIGINT\n"),
        (KeyboardInterrupt(), 130, "fake: interrupted by SIGINT\n"),
    ],
)
def test_an_interrupted_run_exits_with_128_plus_the_signal_and_one_line(interrupt, status, message, capsys):
    def interrupted(cfg):
        raise interrupt

    assert fake_main([], run=interrupted)[0] == status
    captured = capsys.readouterr()
    assert captured.err == message and captured.out == ""
