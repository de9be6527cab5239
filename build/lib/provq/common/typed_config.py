"""Dataclass configs from plain mappings (YAML presets, config.json), every field's name and type checked."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union

from provq.common.errors import ConfigError


def build_config(cls: type, mapping: dict | None, prefix: str = ""):
    """Build dataclass ``cls`` from a mapping, checking every field's name and type.

    Nested dataclass fields take nested mappings; an unknown field or a value of the wrong
    type raises ``ConfigError`` naming the dotted field (``prefix`` + name).
    """
    mapping = {} if mapping is None else mapping
    where = prefix.rstrip(".") or cls.__name__
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping, got {mapping!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"unknown config field '{prefix}{unknown[0]}' (fields here: {known})")
    hints = typing.get_type_hints(cls)
    values = {name: _convert(value, hints[name], f"{prefix}{name}") for name, value in mapping.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:  # a required field without a value, or __post_init__
        raise ConfigError(f"{where}: {err}") from err


def _convert(value: Any, hint: Any, name: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build_config(hint, value, prefix=f"{name}.")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, name)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: {value!r} fits none of {hint}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_convert(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    return _scalar(value, hint, name)


def _scalar(value: Any, hint: Any, name: str) -> Any:
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # no setting of this project means NaN or infinity
                raise ConfigError(f"{name}: expected a finite number, got {value!r}")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{name}: unsupported field type {hint}")
    raise ConfigError(f"{name}: expected {hint.__name__}, got {value!r}")


# check_ranges' kinds of range: (test, what a refused value is told)
RANGES = {"positive": (lambda v: v > 0, "> 0"), "non_negative": (lambda v: v >= 0, ">= 0"),
          "fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"), "at_least_one": (lambda v: v >= 1, ">= 1"),
          "probability": (lambda v: 0 <= v < 1, "in [0, 1)")}


def check_ranges(config, prefix: str = "", bounds: dict[str, tuple[float, float]] | None = None,
                 **kinds: tuple[str, ...]) -> None:
    """Each named field of ``config`` within its meaning: > 0, >= 0, in [0, 1], >= 1 (counts), in [0, 1)
    (probabilities, e.g. dropout) or in ``bounds[name]`` = [low, high]; a ValueError (``prefix`` + the name) that
    names the first one outside (build_config turns it into a ConfigError with the field's path). A
    field set to None (unset: its default applies later) is not checked."""
    checks = [(names, *RANGES[kind]) for kind, names in kinds.items()]
    checks += [((name,), lambda v, lo=lo, hi=hi: lo <= v <= hi, f"in [{lo}, {hi}]")
               for name, (lo, hi) in (bounds or {}).items()]
    for names, ok, want in checks:
        for name in names:
            value = getattr(config, name)
            if value is None:
                continue
            if not ok(value) or (isinstance(value, float) and not math.isfinite(value)):
                raise ValueError(f"{prefix}{name} must be {want}, got {value}")


def config_to_dict(config) -> dict:
    """Plain nested dict (tuples become lists) for YAML/JSON."""

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(config))
