"""Building typed dataclass trees from YAML and dotted overrides, with one-line errors.

Generic over the schema: ``build(RootDataclass, tree)`` walks the dict, rejects unknown
keys (suggesting the closest valid one), and coerces each value to its field's declared
type. ``rl/config.py`` holds placerl's schema; this file knows nothing about it.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem, described in one line."""


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """A schema's validation step: ``key=value`` is refused in one line saying what is allowed."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def one_of(key: str, value: Any, choices: typing.Iterable[str]) -> None:
    choices = list(choices)
    check(value in choices, key, value, "choose one of " + ", ".join(map(str, choices)))


def _suggest(key: str, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        full = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _all_keys(hints[f.name], full + ".")
        else:
            keys.append(full)
    return keys


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML or command-line value to the field's declared type, or fail in one line."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(key, value, arm)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r} has the wrong type: expected {tp}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}={value!r} has the wrong type: expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} has the wrong type: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} has the wrong type: expected a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} has the wrong type: expected a string")
    if origin is list:
        if isinstance(value, str):  # command line: a,b,c or [a, b, c]
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected a list")
        (arm,) = typing.get_args(tp) or (Any,)
        return [_coerce(f"{key}[{i}]", v, arm) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected a mapping")
        return value
    return value


def build(cls: type, data: dict, prefix: str = "", root: type | None = None) -> Any:
    """An instance of dataclass ``cls`` from ``data``; ``root`` is the whole schema, for suggestions."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}={data!r} must be a mapping of keys")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            valid = [prefix + n for n in names]
            hint = _suggest(full, valid) or _suggest(full, _all_keys(root or cls))
            raise ConfigError(f"unknown config key '{full}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value or {}, full + ".", root or cls)
        else:
            kwargs[key] = _coerce(full, value, tp)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_overrides(args: typing.Sequence[str]) -> dict:
    """``["learner.lr=1e-5", "rollout.group_size=8"]`` -> a nested dict of raw strings."""
    tree: dict = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq or not key:
            raise ConfigError(f"override {arg!r} is not of the form section.key=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(value) if value.strip() else "")
    return tree


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_recipe(path) -> dict:
    """A YAML recipe file as a tree; a missing file or bad YAML is one line naming the file."""
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass --config launch/configs/<recipe>.yaml")
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise ConfigError(f"config file {str(p)!r}{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
