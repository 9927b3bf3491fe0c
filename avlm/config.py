"""Typed, validated configuration shared by every recipe.

A recipe's config is a dataclass whose fields are plain types or nested config dataclasses. It loads from
YAML, takes dotted ``key=value`` overrides whose names are the field names exactly, and refuses, with a message
naming the key and where its value came from (the file or the override): unknown keys, keys set twice in a file,
wrong types, non-finite floats and negative seeds (fields named ``seed``, ``*_seed``, ``seeds``, ``*_seeds``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import types
from collections.abc import Hashable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from avlm.errors import ConfigError

C = TypeVar("C")

# Fields named seed, *_seed, seeds or *_seeds hold seeds (numpy and torch generators refuse negative ones).
_SEED_FIELD = re.compile(r"(^|_)seeds?$")
_RUN_ID = re.compile(r"[0-9a-f]{32}")


class _KeyedError(ConfigError):
    """A ConfigError about one config key (or section), so :func:`load_config` can say where its value came from."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class _InvalidValue(_KeyedError):
    """The value has the right type but not an allowed value (a union reports it rather than "expected ...")."""


def _error(key: str, message: str, kind: type[_KeyedError] = _KeyedError) -> _KeyedError:
    return kind(key, f"config key '{key}': {message}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key set twice in one mapping (PyYAML silently keeps the last value)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # keys merged in with `<<: *anchor` may be overridden: that is what merging is for
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # the base class refuses it with its own message
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise ConfigError(
                    f"config file {self.name}: duplicate key '{key}' at line {line} "
                    f"(first set at line {first_line[key]})"
                )
            first_line[key] = line
        return super().construct_mapping(node, deep)


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
            raise _error(key, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if origin is Literal:
        if value not in get_args(tp):
            raise _error(key, f"expected one of {_type_name(tp)}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        invalid: _InvalidValue | None = None
        for option in get_args(tp):
            try:
                return _coerce(value, option, key)
            except _InvalidValue as err:
                invalid = err
            except ConfigError:
                continue
        raise invalid or _error(key, f"expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is not None:
            raise _error(key, f"expected null, got {value!r}")
        return None
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _error(key, f"expected {_type_name(tp)}, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _error(key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _error(key, f"expected an integer, got {value!r}")
        if value < 0 and _SEED_FIELD.search(key.rsplit(".", 1)[-1].split("[")[0]):
            raise _error(key, f"a seed must be >= 0, got {value}", _InvalidValue)
        return value
    if tp is float:
        # YAML reads 1e-4 as a string (YAML 1.1 needs a dot); accept numeric strings for floats only.
        number = None
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise _error(key, f"expected a number, got {value!r}")
        if not math.isfinite(number):
            raise _error(key, f"expected a finite number, got {value!r}", _InvalidValue)
        return number
    if tp is str:
        if not isinstance(value, str):
            raise _error(key, f"expected a string, got {value!r}")
        return value
    raise _error(key, f"unsupported field type {tp!r}")  # a bug in a config class


def _build(cls: type[C], values: Mapping[str, Any], prefix: str = "") -> C:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise _KeyedError(
            f"{prefix}{unknown[0]}",
            f"unknown config key '{prefix}{unknown[0]}' (valid keys under '{prefix or '<top>'}': "
            f"{', '.join(sorted(fields))})",
        )
    kwargs = {}
    for name, value in values.items():
        field = fields[name]
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, Mapping) and callable(field.default_factory):
            # A recipe's own defaults for a shared section (e.g. the caption recipe's registry name) stay in force
            # for the keys the YAML does not set.
            value = _deep_merge(config_to_dict(field.default_factory()), value)
        kwargs[name] = _coerce(value, hints[name], f"{prefix}{name}")
    section = prefix.rstrip(".")
    try:
        return cls(**kwargs)
    except _KeyedError:
        raise
    except ConfigError as err:  # from a __post_init__: about this section
        raise _KeyedError(section, str(err)) from err
    except (TypeError, ValueError) as err:
        raise _KeyedError(section, f"config section '{section or '<top>'}': {err}") from err


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
            raise _error(dotted, f"'{part}' is not a section")
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


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with path.open() as stream:  # a stream, so that the loader's messages name the file
            loaded = yaml.load(stream, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(loaded).__name__}")
    return loaded


def _record_origins(origins: dict[str, str], tree: Mapping[str, Any], source: str, prefix: str = "") -> None:
    for key, value in tree.items():
        origins[f"{prefix}{key}"] = source
        if isinstance(value, Mapping):
            _record_origins(origins, value, source, f"{prefix}{key}.")


def _sources_of(key: str, origins: Mapping[str, str]) -> list[str]:
    """Where the value of ``key`` came from; for a section, where the values under it came from."""
    key = key.split("[")[0]
    found = [src for k, src in origins.items() if not key or k == key or k.startswith(f"{key}.")]
    return list(dict.fromkeys(found))


def load_config(
    cls: type[C], path: str | Path | None = None, overrides: Iterable[str] = (), *, base: Any | None = None
) -> C:
    """Load a recipe config: dataclass defaults ← ``base`` ← YAML file ← ``key=value`` overrides.

    An error about a key names where its value came from: the file, or the override. ``base`` (a config of
    type ``cls``) stands for what a derived run inherits, e.g. the config of the checkpoint it starts from.

    Raises:
        ConfigError: the file is missing, not a YAML mapping or sets a key twice, a key is unknown, or a value has
            the wrong type or is out of range.
    """
    tree = _read_yaml_mapping(Path(path)) if path else {}
    origins: dict[str, str] = {}
    _record_origins(origins, tree, str(path))
    if base is not None:
        tree = _deep_merge(config_to_dict(base), tree)
    try:
        for text in overrides:
            key, value = parse_override(text)
            for replaced in [k for k in origins if k.startswith(f"{key}.")]:
                del origins[replaced]  # the override replaces the whole section
            origins[key] = f"override '{text}'"
            _set_dotted(tree, key, value)
        return config_from_dict(cls, tree)
    except _KeyedError as err:
        sources = _sources_of(err.key, origins)
        raise ConfigError(f"{err} [in {' and '.join(sources)}]" if sources else str(err)) from err


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the whole resolved config as YAML (loadable again with :func:`load_config`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


def validate_resume(resume: str, output_dir: str | Path) -> None:
    """Refuse a ``resume`` that is neither an MLflow run id nor a checkpoint folder, before anything is created.

    A run id's checkpoints are downloaded into ``<output_dir>/resumed/<run id>``; only a real id may form that
    path, so that ``resume=../..`` can neither create folders outside the output folder nor resume from a folder
    that holds no checkpoint. An empty ``resume`` (start afresh) passes.

    Raises:
        ConfigError: naming the value and the two accepted forms.
    """
    from avlm.train.checkpoint import STATE_FILE  # imported here: it brings in torch, which configs do not need

    if not resume or _RUN_ID.fullmatch(resume) or (Path(resume) / STATE_FILE).is_file():
        return
    raise ConfigError(
        f"config key 'resume': {resume!r} is neither an MLflow run id (32 lowercase hex characters, downloaded "
        f"into {Path(output_dir) / 'resumed'}/<run id>) nor a checkpoint folder holding {STATE_FILE}"
    )
