import dataclasses
import re
from typing import Literal

import pytest

from avlm.config import config_to_dict, flatten_config, load_config, parse_override, save_config, validate_resume
from avlm.errors import ConfigError


@dataclasses.dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10
    mode: Literal["a", "b"] = "a"
    names: list[str] = dataclasses.field(default_factory=lambda: ["x"])


@dataclasses.dataclass
class Outer:
    seed: int = 1
    path: str = ""
    flag: bool = False
    inner: Inner = dataclasses.field(default_factory=Inner)


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_yaml_and_overrides_layer_in_order(tmp_path):
    path = write(tmp_path, "seed: 3\ninner:\n  lr: 1e-4\n  names: [q, k]\n")
    cfg = load_config(Outer, path, ["inner.steps=7", "inner.mode=b", "path=1234", "flag=true"])
    assert cfg.seed == 3 and cfg.inner.lr == pytest.approx(1e-4) and cfg.inner.names == ["q", "k"]
    assert cfg.inner.steps == 7 and cfg.inner.mode == "b" and cfg.flag is True
    assert cfg.path == "1234"  # string fields keep the override's text: run ids that look like numbers survive


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = write(tmp_path, "inner:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'inner\.lrr'.*c\.yaml"):
        load_config(Outer, path)
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        load_config(Outer, None, ["bogus=1"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("inner.steps=abc", "'inner.steps': expected an integer"),
        ("inner.steps=1.5", "'inner.steps': expected an integer"),
        ("inner.lr=fast", "'inner.lr': expected a number"),
        ("inner.mode=c", "'inner.mode': expected one of 'a' | 'b'"),
        ("flag=maybe", "'flag': expected true/false"),
        ("inner.names=3", "'inner.names': expected list of str"),
        ("inner=5", "'inner': expected a mapping"),
        ("seed", "not of the form key=value"),
    ],
)
def test_wrong_types_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("|", r"\|")):
        load_config(Outer, None, [override])


def test_missing_or_non_mapping_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Outer, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(Outer, write(tmp_path, "- 1\n- 2\n"))


def test_flatten_and_yaml_round_trip(tmp_path):
    cfg = load_config(Outer, None, ["inner.lr=0.5"])
    flat = flatten_config(cfg, prefix="cfg.")
    assert flat["cfg.inner.lr"] == 0.5 and flat["cfg.inner.names"] == ["x"] and flat["cfg.seed"] == 1
    path = save_config(cfg, tmp_path / "out.yaml")
    assert load_config(Outer, path) == cfg
    assert config_to_dict(cfg)["inner"]["mode"] == "a"


def test_parse_override_keeps_text():
    assert parse_override("a.b=[1, 2]") == ("a.b", "[1, 2]")


@dataclasses.dataclass
class RecipeWithOwnDefaults:
    inner: Inner = dataclasses.field(default_factory=lambda: Inner(lr=0.5, mode="b"))


def test_a_recipes_section_defaults_survive_a_partial_yaml_section(tmp_path):
    cfg = load_config(RecipeWithOwnDefaults, write(tmp_path, "inner:\n  steps: 3\n"), ["inner.names=[y]"])
    assert cfg.inner == Inner(lr=0.5, steps=3, mode="b", names=["y"])
    assert load_config(RecipeWithOwnDefaults).inner == Inner(lr=0.5, mode="b")


def test_a_key_set_twice_in_a_file_is_refused_naming_the_file_the_key_and_both_lines(tmp_path):
    path = write(tmp_path, "seed: 3\ninner:\n  lr: 0.1\n  steps: 2\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=rf"config file {path}: duplicate key 'lr' at line 5 \(first set at line 3\)"):
        load_config(Outer, path)
    with pytest.raises(ConfigError, match=r"duplicate key 'seed' at line 2 \(first set at line 1\)"):
        load_config(Outer, write(tmp_path, "seed: 3\nseed: 4\n"))


def test_yaml_merge_keys_may_still_override_what_they_merge(tmp_path):
    path = write(tmp_path, "base: &base {lr: 0.1, steps: 2}\ninner:\n  <<: *base\n  steps: 5\n")

    @dataclasses.dataclass
    class WithBase:
        base: Inner = dataclasses.field(default_factory=Inner)
        inner: Inner = dataclasses.field(default_factory=Inner)

    cfg = load_config(WithBase, path)
    assert (cfg.inner.lr, cfg.inner.steps) == (0.1, 5)


@dataclasses.dataclass
class Seeded:
    seed: int = 0
    demo_seed: int | None = None
    seeds: list[int] = dataclasses.field(default_factory=lambda: [1])
    offset: int = 0  # not a seed: may be negative


@pytest.mark.parametrize(
    "override, key",
    [("seed=-1", "seed"), ("demo_seed=-1", "demo_seed"), ("seeds=[1, -2]", r"seeds\[1\]")],
)
def test_a_negative_seed_is_refused_in_any_seed_field(override, key):
    with pytest.raises(ConfigError, match=rf"config key '{key}': a seed must be >= 0, got -\d"):
        load_config(Seeded, None, [override])


def test_seeds_of_zero_and_negative_non_seed_integers_pass(tmp_path):
    cfg = load_config(Seeded, write(tmp_path, "seed: 0\ndemo_seed: 0\nseeds: [0, 7]\noffset: -3\n"))
    assert (cfg.seed, cfg.demo_seed, cfg.seeds, cfg.offset) == (0, 0, [0, 7], -3)


def test_every_recipe_seed_field_refuses_a_negative_seed():
    from avlm.recipes import caption, cvs, probe

    for load in (cvs.load_cvs_config, caption.load_caption_config, probe.load_probe_config):
        seed_keys = [k for k in flatten_config(load()) if k.rsplit(".", 1)[-1].endswith(("seed", "seeds"))]
        assert seed_keys, load
        for key in seed_keys:
            negative = "[-1]" if key.endswith("seeds") else "-1"
            with pytest.raises(ConfigError, match="a seed must be >= 0"):
                load(None, [f"{key}={negative}"])


@dataclasses.dataclass
class Rates:
    lr: float = 1e-3
    floor: float | None = None


@pytest.mark.parametrize(
    "text, shown",
    [("nan", "'nan'"), ("inf", "'inf'"), ("-inf", "'-inf'"), ("1e999", "'1e999'"), (".nan", "nan"), ("-.inf", "-inf")],
)
def test_a_float_that_is_not_finite_is_refused_naming_the_key_and_the_value(text, shown, tmp_path):
    with pytest.raises(ConfigError, match=rf"config key 'lr': expected a finite number, got {shown} \[in override"):
        load_config(Rates, None, [f"lr={text}"])
    with pytest.raises(ConfigError, match=rf"config key 'floor': expected a finite number, got {shown} \[in .*c\.yaml"):
        load_config(Rates, write(tmp_path, f"floor: {text}\n"))


def test_an_error_in_an_override_names_the_override_not_the_file(tmp_path):
    path = write(tmp_path, "seed: 3\ninner:\n  steps: 2\n")
    for override, message in [
        ("inner.steps=abc", "'inner.steps': expected an integer"),
        ("inner.bogus=1", "unknown config key 'inner.bogus'"),
        ("inner=5", "'inner': expected a mapping"),
        ("seed.x=1", "'seed.x': 'seed' is not a section"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(Outer, path, [override])
        assert message in str(err.value) and str(err.value).endswith(f"[in override '{override}']"), err.value
    with pytest.raises(ConfigError) as err:
        load_config(Outer, write(tmp_path, "inner:\n  steps: x\n"), ["inner.lr=0.5"])
    assert str(err.value).endswith(f"[in {path}]"), err.value  # the file's own error names the file only


@dataclasses.dataclass
class Window:
    low: int = 0
    high: int = 10

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ConfigError(f"config key 'window.low' must be <= window.high, got {self.low} > {self.high}")


@dataclasses.dataclass
class Windowed:
    window: Window = dataclasses.field(default_factory=Window)


def test_a_section_check_names_every_source_of_the_section(tmp_path):
    path = write(tmp_path, "window:\n  low: 5\n")
    with pytest.raises(
        ConfigError, match=rf"must be <= window.high, got 5 > 4 \[in {path} and override 'window.high=4'\]$"
    ):
        load_config(Windowed, path, ["window.high=4"])
    with pytest.raises(ConfigError, match=r"got 20 > 10 \[in override 'window.low=20'\]$"):
        load_config(Windowed, None, ["window.low=20"])


def test_resume_must_be_a_run_id_or_a_checkpoint_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint = tmp_path / "outputs" / "run" / "checkpoints" / "last"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text("{}")
    for good in ["", "0123456789abcdef0123456789abcdef", str(checkpoint)]:
        validate_resume(good, "outputs")
    before = sorted(tmp_path.rglob("*"))
    for bad in [
        "../..",
        "../../0123456789abcdef0123456789abcdef",
        "0123456789ABCDEF0123456789ABCDEF",
        str(checkpoint.parent),
    ]:
        with pytest.raises(
            ConfigError, match=rf"config key 'resume': '{re.escape(bad)}' is neither an MLflow run id.*state\.json"
        ):
            validate_resume(bad, "outputs")
    assert sorted(tmp_path.rglob("*")) == before  # refused before anything was created
