import dataclasses
from typing import Literal

import pytest

from avlm.config import config_to_dict, flatten_config, load_config, parse_override, save_config
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
