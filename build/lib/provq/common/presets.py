"""Presets: YAML files of sections (``data:``, ``tokenizer:``, ...) shipped in provq/configs, read with
YAML 1.2 booleans and ``base:`` inheritance; a run folder's resolved config is written the same way."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from provq.common.errors import ConfigError
from provq.common.files import write_atomic
from provq.common.typed_config import build_config, config_to_dict

# Shipped inside the package (provq/configs; a clone's configs/ links to it), so an installed
# provq finds its presets by name from any directory.
PRESETS_DIR = Path(__file__).resolve().parents[1] / "configs"


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


def parse_yaml_value(text):
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data only


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_path(name: str | Path) -> Path:
    """A YAML file's path, or a shipped preset's by name (``"emoji32"``): a name works from any
    directory once provq is installed, a path is read as given."""
    path = Path(name)
    if path.is_file() or path.suffix or len(path.parts) > 1:
        return path
    shipped = PRESETS_DIR / f"{name}.yaml"
    if not shipped.is_file():
        raise ConfigError(f"no preset {str(name)!r} and no such file; the presets are {preset_names()}")
    return shipped


def load_preset(name: str) -> dict:
    """A preset by name (``"emoji32"``, ``"imagenet256"``) or path, as a mapping."""
    return load_yaml(preset_path(name))


def preset_section(name: str, dotted: str, cls: type, **overrides):
    """One section of a preset as its dataclass, e.g. ``preset_section("emoji32", "tokenizer.model",
    TokenizerConfig)``; ``overrides`` replace top-level fields of the section."""
    section = load_preset(name)
    for key in dotted.split("."):
        section = section.get(key, {})
    return build_config(cls, {**section, **overrides}, prefix=f"{dotted}.")


def load_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """A preset (a path, or a shipped preset's name); ``base: other.yaml`` (relative to this file)
    is loaded first and deep-merged under it."""
    path = preset_path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'base' files include each other")
    try:
        with path.open() as f:
            mapping = parse_yaml_value(f) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML: {problem}{where}") from None
    except (UnicodeDecodeError, IsADirectoryError) as error:
        raise ConfigError(f"{path} is not a YAML text file ({error})") from None
    if not isinstance(mapping, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = mapping.pop("base", None)
    if base is not None:
        mapping = merge_mappings(load_yaml(path.parent / base, (*_seen, path.resolve())), mapping)
    return mapping


def merge_mappings(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_mappings(merged[key], value)
        else:
            merged[key] = value
    return merged


def save_config(config, path: str | Path) -> None:
    """Write the resolved config, so a run folder says exactly what ran."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    write_atomic(path, lambda tmp: tmp.write_text(text), "the run's config")
