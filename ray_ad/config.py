"""Typed configs built from nested dicts, JSON/YAML files and ``--set key=value`` overrides.

Every config is a dataclass; ``from_dict`` rejects unknown keys and wrong types with a message naming
the key, so a typo in a sweep or a CLI flag fails at once instead of silently training the default.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import yaml

from ray_ad import storage
from ray_ad.errors import ConfigError

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, recursing into nested dataclasses."""
    data = dict(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {_key(where, unknown[0])!r}; valid keys: {', '.join(sorted(names))}"
        )
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        default = defaults[name].default_factory  # type: ignore[misc]
        if isinstance(value, dict) and default is not dataclasses.MISSING:
            # A partial nested section overrides the field's own default, not the class default.
            base = default()
            if dataclasses.is_dataclass(base):
                value = merge(to_dict(base), value)
        kwargs[name] = _coerce(hints[name], value, _key(where, name))
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def to_dict(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        return from_dict(hint, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"config key {key!r}: bad value {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        items = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "3e-4" (no dot) as a string.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
    if typing.get_origin(hint) is typing.Literal:
        if value in typing.get_args(hint):
            return value
        choices = ", ".join(map(repr, typing.get_args(hint)))
        raise ConfigError(f"config key {key!r} must be one of {choices}, got {value!r}")
    return value


def load_file(uri: str) -> dict[str, Any]:
    """A JSON or YAML config file as a dict."""
    text = storage.read_text(uri)
    try:
        data = yaml.safe_load(text) if not uri.endswith(".json") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot parse config file {uri}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {uri} must hold a mapping, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with dotted-key overrides applied (``train.lr`` -> ``{"train": {"lr": ...}}``).

    ``overrides`` is a list of ``a.b.c=value`` strings (``--set``: values parsed as YAML, so ``3``,
    ``0.1``, ``[1,2]``, ``true``), or a mapping from dotted keys to values used as they are (a sweep's
    sampled values).
    """
    data = json.loads(json.dumps(data))
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            set_dotted(data, key, value, f"key {key!r}")
        return data
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(data, key, value, f"override {item!r}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", value parsed as YAML)``."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: cannot parse value {raw!r}") from exc


def override_section(item: str) -> str:
    """The top-level section an override sets: ``"gate.margin=0.1"`` -> ``"gate"``, ``"t=250"`` -> ``"t"``."""
    return item.partition("=")[0].split(".")[0]


def set_dotted(data: dict[str, Any], key: str, value: Any, what: str = "", replace: bool = True) -> None:
    """Set ``value`` at dotted ``key`` of the nested mapping ``data`` in place, creating missing sections.

    ``replace=False`` keeps a value already there (filling defaults). ``what`` names the key in errors
    (default: the key itself).
    """
    what = what or f"key {key!r}"
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"{what} has an empty key")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{what}: {part!r} is not a section")
        node = child
    if replace:
        node[parts[-1]] = value
    else:
        node.setdefault(parts[-1], value)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``update`` into a copy of ``base``."""
    out = json.loads(json.dumps(base))
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out
