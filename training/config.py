"""Run configs: YAML presets plus dotted command-line overrides, and the optimisation fields.

A preset file has one section per stage (``data:``, ``tokenizer:``,
``prior:``, ...). A script declares a dataclass whose fields are the sections
it reads; every field can be overridden by its dotted path, e.g.
``--tokenizer.model.quantizer.codebook_size 512``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from common.cli import CommandParser
from common.errors import ConfigError
from common.files import check_output_dir, write_atomic
from common.typed_config import build_config, check_ranges, config_to_dict

PRESETS_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping fields common to both stages."""

    max_steps: int = 1000
    batch_size: int = 32  # per process; the global batch is batch_size * processes * grad_accum_steps
    grad_accum_steps: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0
    optimizer: str = "adamw"  # adamw (decoupled decay) | adam (LlamaGen's tokenizer: Adam, no decay)
    weight_decay: float = 0.0
    weight_decay_1d: bool = True  # decay biases and norm scales too (False: LlamaGen's GPT groups)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    mixed_precision: str = "no"  # no | bf16 | fp16 (fp16 on GPUs only) | auto (bf16 where it is faster)
    compile: bool = False  # compile the model's hot blocks in place (inductor): faster steps, a slow first one
    ema_decay: float = 0.0  # 0 = no EMA
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2
    image_every: int = 500  # picture grids (reconstructions or samples)
    eval_every: int = 0  # 0 = only at the end

    def __post_init__(self):
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be adam or adamw, not {self.optimizer!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16", "auto"):
            raise ValueError(f"mixed_precision must be no, bf16, fp16 or auto, not {self.mixed_precision!r}")
        for name in ("max_steps", "batch_size", "grad_accum_steps", "log_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_ranges(self, positive=("lr",), fraction=("min_lr_ratio", "beta1", "beta2", "ema_decay"),
                     non_negative=("warmup_steps", "weight_decay", "grad_clip", "keep_checkpoints",
                                   "image_every", "eval_every"))


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


def make_parser(description: str, training_run: bool = True, config_required: bool = True) -> argparse.ArgumentParser:
    """The one parser builder of the stage scripts: ``--config`` and ``--output_dir``, and for a
    training run ``--max_steps --seed --resume``; scripts add their own flags."""
    parser = CommandParser(
        description=description,
        epilog="Any config field can be overridden by its dotted path, e.g. "
        "--data.resolution 64.",
    )
    parser.add_argument("--config", required=config_required, default=None,
                        help="preset YAML file (configs/*.yaml)")
    parser.add_argument("--output_dir", required=True, help="run folder")
    if training_run:
        parser.add_argument("--max_steps", type=int, default=None, help="override <stage>.train.max_steps")
        parser.add_argument("--seed", type=int, default=None, help="override <stage>.train.seed")
        parser.add_argument(
            "--resume", default=None, help="'latest' or a checkpoint folder to continue from"
        )
    return parser


# The sections a preset may have: one per stage, each read by the scripts of that stage.
SECTIONS = ("data", "tokenizer", "prior", "sample")


def parse_config(parser: argparse.ArgumentParser, schema: type, stage: str | None, argv=None,
                 shortcuts: dict[str, str] | None = None, defaults: dict | None = None):
    """Parse the command line into ``(config, args)``; ``config`` is a ``schema`` instance.

    Dotted flags override fields of the preset, which overrides ``defaults``; ``shortcuts`` maps a
    plain flag to the field it sets (a training ``stage``'s ``--max_steps`` and ``--seed`` are
    ``<stage>.train.max_steps`` and ``<stage>.train.seed``). A preset section no stage reads, or an
    override of a section this script does not read, is a ``ConfigError`` that names it: a typo
    never passes silently.
    """
    args, rest = parser.parse_known_args(argv)
    overrides = _pairs(rest, parser)
    check_output_dir(args.output_dir)  # before anything else reads or writes
    shortcuts = dict(shortcuts or {})
    if stage is not None:
        shortcuts.update({"max_steps": f"{stage}.train.max_steps", "seed": f"{stage}.train.seed"})
    for name, dotted in shortcuts.items():
        if getattr(args, name, None) is not None:
            overrides[dotted] = getattr(args, name)
    # A deep copy: the overrides below write into the mapping, never into the caller's defaults.
    mapping = copy.deepcopy(_merge(defaults or {}, load_yaml(args.config) if args.config else {}))
    wanted = {f.name for f in dataclasses.fields(schema)}
    known = sorted(wanted | set(SECTIONS))
    unknown = sorted(set(mapping) - set(known))
    if unknown:
        raise ConfigError(f"{args.config}: unknown section '{unknown[0]}' (sections: {', '.join(known)})")
    for dotted, value in overrides.items():
        section = dotted.split(".")[0]
        if section not in wanted:
            raise ConfigError(f"--{dotted}: this command reads no section '{section}' "
                              f"(it reads: {', '.join(sorted(wanted))})")
        _set_dotted(mapping, dotted, value)
    mapping = {k: v for k, v in mapping.items() if k in wanted}
    return build_config(schema, mapping), args


def load_preset(name: str) -> dict:
    """A preset of configs/ by name (``"emoji32"``, ``"imagenet256"``) or path, as a mapping."""
    path = Path(name)
    if not path.suffix:
        path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ConfigError(f"no preset {name!r}; the presets are {known}")
    return load_yaml(path)


def preset_section(name: str, dotted: str, cls: type, **overrides):
    """One section of a preset as its dataclass, e.g. ``preset_section("emoji32", "tokenizer.model",
    TokenizerConfig)``; ``overrides`` replace top-level fields of the section."""
    section = load_preset(name)
    for key in dotted.split("."):
        section = section.get(key, {})
    return build_config(cls, {**section, **overrides}, prefix=f"{dotted}.")


def load_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """A preset; ``base: other.yaml`` (relative to this file) is loaded first and deep-merged under it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'base' files include each other")
    try:
        with path.open() as f:
            mapping = _load(f) or {}
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


def save_config(config, path: str | Path) -> None:
    """Write the resolved config, so a run folder says exactly what ran."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    write_atomic(path, lambda tmp: tmp.write_text(text), "the run's config")
