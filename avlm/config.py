"""Typed, validated configuration shared by every recipe.

A recipe's config is a dataclass whose fields are plain types or nested config dataclasses. It loads from
YAML, takes dotted ``key=value`` overrides whose names are the field names exactly, and refuses unknown keys
and wrong types with a message naming the key (and the file it came from).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from avlm.errors import ConfigError

C = TypeVar("C")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


class _OverrideText(str):
    """A ``key=value`` override's raw text: kept verbatim for string fields, read as YAML for the others
    (so ``resume=1234`` stays the string "1234" while ``train.epochs=3`` becomes the integer 3)."""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` checked against type ``tp``; raise ConfigError naming ``key`` if it does not fit."""
    if isinstance(value, _OverrideText):
        if tp is str:
            return str(value)
        try:
            value = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            value = str(value)
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}': expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"config key '{key}': expected one of {_type_name(tp)}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"config key '{key}': expected null, got {value!r}")
        return None
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML reads 1e-4 as a string (YAML 1.1 needs a dot); accept numeric strings for floats only.
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported field type {tp!r}")  # a bug in a config class


def _build(cls: type[C], values: Mapping[str, Any], prefix: str = "") -> C:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (valid keys under '{prefix or '<top>'}': "
            f"{', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in values.items():
        field = fields[name]
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, Mapping) and callable(field.default_factory):
            # A recipe's own defaults for a shared section (e.g. the caption recipe's registry name) stay in force
            # for the keys the YAML does not set.
            value = _deep_merge(config_to_dict(field.default_factory()), value)
        kwargs[name] = _coerce(value, hints[name], f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config section '{prefix or '<top>'}': {err}") from err


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            value = _deep_merge(merged[key], value)
        merged[key] = value
    return merged


def config_from_dict(cls: type[C], values: Mapping[str, Any]) -> C:
    """Build and validate a config from a nested mapping."""
    return _build(cls, values)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain-Python dict of a config (lists, not tuples, so YAML stays plain)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def flatten_config(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Flat ``{"train.lr": 5e-4, ...}`` view of a config, for MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in config_to_dict(cfg).items():
        _flatten_into(flat, f"{prefix}{key}", value)
    return flat


def _flatten_into(flat: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten_into(flat, f"{key}.{k}", v)
    else:
        flat[key] = value


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{dotted}': '{part}' is not a section")
        node = child
    node[leaf] = value


def parse_override(text: str) -> tuple[str, str]:
    """Split ``"train.lr=1e-3"`` into ``("train.lr", "1e-3")``; the value is typed against the field later
    (read as YAML unless the field is a string, so ``[1, 2]`` becomes a list)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    return key, _OverrideText(raw)


def load_config(cls: type[C], path: str | Path | None = None, overrides: Iterable[str] = ()) -> C:
    """Load a recipe config: dataclass defaults ← YAML file ← ``key=value`` overrides.

    Raises:
        ConfigError: the file is missing or not a YAML mapping, a key is unknown, or a value has the wrong type.
    """
    tree: dict[str, Any] = {}
    source = "overrides"
    if path:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(loaded).__name__}")
        tree = loaded
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        return config_from_dict(cls, tree)
    except ConfigError as err:
        raise ConfigError(f"{err} [in {source}]") from err


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the whole resolved config as YAML (loadable again with :func:`load_config`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path
