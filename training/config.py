"""Typed configs from YAML presets plus dotted command-line overrides.

A preset file has one section per stage (``data:``, ``tokenizer:``,
``prior:``, ...). A script declares a dataclass whose fields are the sections
it reads; every field can be overridden by its dotted path, e.g.
``--tokenizer.model.quantizer.codebook_size 512``.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config field that does not exist, or a value of the wrong type."""


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 booleans: only true/false, so ``mixed_precision: no`` stays "no"."""


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _load(text):
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data only


def make_parser(description: str) -> argparse.ArgumentParser:
    """The flags every script takes; scripts add their own."""
    parser = argparse.ArgumentParser(
        description=description,
        epilog="Any config field can be overridden by its dotted path, e.g. "
        "--data.resolution 64.",
    )
    parser.add_argument("--config", required=True, help="preset YAML file (configs/*.yaml)")
    parser.add_argument("--output_dir", required=True, help="run folder")
    parser.add_argument("--max_steps", type=int, default=None, help="override <stage>.train.max_steps")
    parser.add_argument("--seed", type=int, default=None, help="override <stage>.train.seed")
    parser.add_argument(
        "--resume", default=None, help="'latest' or a checkpoint folder to continue from"
    )
    return parser


def parse_config(parser: argparse.ArgumentParser, schema: type, stage: str | None, argv=None):
    """Parse the command line into ``(config, args)``; ``config`` is a ``schema`` instance."""
    args, rest = parser.parse_known_args(argv)
    overrides = _pairs(rest, parser)
    if stage is not None:
        if args.max_steps is not None:
            overrides[f"{stage}.train.max_steps"] = args.max_steps
        if args.seed is not None:
            overrides[f"{stage}.train.seed"] = args.seed
    mapping = load_yaml(args.config)
    for dotted, value in overrides.items():
        _set_dotted(mapping, dotted, value)
    wanted = {f.name for f in dataclasses.fields(schema)}
    mapping = {k: v for k, v in mapping.items() if k in wanted}
    return build_config(schema, mapping), args


def load_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """A preset; ``base: other.yaml`` (relative to this file) is loaded first and deep-merged under it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'base' files include each other")
    with path.open() as f:
        mapping = _load(f) or {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = mapping.pop("base", None)
    if base is not None:
        mapping = _merge(load_yaml(path.parent / base, (*_seen, path.resolve())), mapping)
    return mapping


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _pairs(rest: list[str], parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Turn ``--a.b value`` / ``--a.b=value`` leftovers into {dotted: value}."""
    pairs, i = {}, 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--") or "." not in token:
            parser.error(f"unrecognized argument: {token}")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(rest) or rest[i + 1].startswith("--"):
                parser.error(f"{token} needs a value")
            i += 1
            value = rest[i]
        pairs[key] = _load(value) if value != "" else ""
        i += 1
    return pairs


def _set_dotted(mapping: dict, dotted: str, value: Any) -> None:
    node = mapping
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{part}' is not a section")
    node[parts[-1]] = value


def build_config(cls: type, mapping: dict | None, prefix: str = ""):
    """Build dataclass ``cls`` from a mapping, checking every field's name and type."""
    mapping = {} if mapping is None else mapping
    if not isinstance(mapping, dict):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected a mapping, got {mapping!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"unknown config field '{prefix}{unknown[0]}' (fields here: {known})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in mapping.items():
        values[name] = _convert(value, hints[name], f"{prefix}{name}")
    try:
        return cls(**values)
    except TypeError as err:  # a required field without a value
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from err
    except ValueError as err:  # a dataclass's own __post_init__ validation
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from err


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
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{name}: unsupported field type {hint}")
    raise ConfigError(f"{name}: expected {hint.__name__}, got {value!r}")


def config_to_dict(config) -> dict:
    """Plain nested dict (tuples become lists) for YAML/JSON."""

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(config))


def save_config(config, path: str | Path) -> None:
    """Write the resolved config, so a run folder says exactly what ran."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    tmp.replace(path)
