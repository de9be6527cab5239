"""The command line: entry points (a user error ends a command with one line on stderr and exit
status 2), the stage commands' parser and their config from preset + dotted overrides.

    def entry() -> None:                     # the console command provq-train-tokenizer
        run_command(command_name("train_tokenizer.py"), main)

``main(argv)`` raises typed errors like any library call; only the command line turns a
``UserError`` into ``<command>: error: <message>`` (printed by the first process alone under a
launcher) and exit status 2. Any other exception is a bug and keeps its traceback; so does a
user error when PROVQ_DEBUG=1.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from provq.common.errors import ConfigError, UserError
from provq.common.files import check_output_dir
from provq.common.presets import load_yaml, merge_mappings, parse_yaml_value
from provq.common.typed_config import build_config

T = TypeVar("T")
DEBUG_VARIABLE = "PROVQ_DEBUG"


class CommandParser(argparse.ArgumentParser):
    """argparse whose mistakes (a missing, unknown or malformed flag) are ``ConfigError``s, so they end
    like every other user error: one line and exit status 2 under ``run_command``."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see {self.prog} --help)")


def user_error_line(command: str, error: BaseException) -> str:
    message = " ".join(str(error).split()) or type(error).__name__  # one line, whatever the message
    return f"{command}: error: {message}"


def command_name(default: str) -> str:
    """The name the user typed (``provq-sample``, ``sample.py``), for error lines; ``default`` when
    started as ``python -m package`` (whose program is ``__main__.py``)."""
    typed = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return typed if typed and typed not in ("__main__.py", "-c") else default


def run_command(command: str, main: Callable[..., T], argv: list[str] | None = None) -> T:
    """``main(argv)``, with user errors as one line and exit status 2."""
    try:
        return main(argv)
    except UserError as error:
        if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            print(user_error_line(command, error), file=sys.stderr, flush=True)
        raise SystemExit(2) from None


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
    mapping = copy.deepcopy(merge_mappings(defaults or {}, load_yaml(args.config) if args.config else {}))
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
        pairs[key] = parse_yaml_value(value) if value != "" else ""
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


