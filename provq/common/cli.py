"""The command line: entry points (a user error ends a command with one line on stderr and exit
status 2; a signal with one line saying where it stopped and how to continue, and exit status 130
(SIGINT) or 143 (SIGTERM)), the stage commands' parser and their config from preset + dotted overrides.

    def entry() -> None:                     # the console command provq-train-tokenizer
        run_command(command_name("train_tokenizer.py"), main, resume="resume with --resume latest")

``main(argv)`` raises typed errors like any library call; only the command line turns a
``UserError`` into ``<command>: error: <message>`` (printed by the first process alone under a
launcher) and exit status 2, and a full disk or an unwritable file met anywhere into the same.
Any other exception is a bug and keeps its traceback; so does a user error when PROVQ_DEBUG=1.
In a command that passes ``resume``, SIGINT and SIGTERM are handled as ``common.signals``
describes; in the others a Ctrl-C ends the command at once, as one line.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from provq.common import signals
from provq.common.errors import ConfigError, UserError
from provq.common.files import check_output_dir, storage_cause
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


def run_command(command: str, main: Callable[..., T], argv: list[str] | None = None, resume: str | None = None) -> T:
    """``main(argv)``, with user errors (and a full disk met anywhere) as one line and exit status 2.

    ``resume`` (how the command continues after a stop) says it has safe points: SIGINT and SIGTERM
    then stop it at the next one (``common.signals``) with one line ending in ``resume`` and exit
    status 128 + the signal. Without it, Ctrl-C stops the command at once, in one line too."""
    with signals.handled() if resume is not None else contextlib.nullcontext():
        try:
            return main(argv)
        except BaseException as error:
            signals.ending()  # a signal from here on (a second Ctrl-C while this line is printed) waits
            status, line = outcome(command, error, resume)
            if status is None:
                raise
            say(line, error)
            raise SystemExit(status) from None


def outcome(command: str, error: BaseException, resume: str | None) -> tuple[int | None, str]:
    """The exit status and the line of a command that ended with ``error``; (None, "") for a bug
    (and, with PROVQ_DEBUG=1, a user error), which keeps its traceback."""
    then = f"; {resume}" if resume else ""
    if isinstance(error, signals.Interrupted):
        return error.exit_status, f"{command}: {error.message}{then}"
    if isinstance(error, KeyboardInterrupt):
        return 130, f"{command}: stopped by SIGINT"
    if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
        return None, ""
    if isinstance(error, UserError):
        return 2, user_error_line(command, error)
    cause = storage_cause(error) if isinstance(error, OSError) else None
    if cause:  # a full disk or an unwritable file where no writer named it
        return 2, f"{command}: error: " + (f"{error.filename}: {cause}" if error.filename else cause)
    if isinstance(error, Exception) and signals.forced():  # a peer that left a collective when stopped at once
        return 128 + signals.pending(), f"{command}: stopped at once by a second signal{then}"
    return None, ""


def say(line: str, error: BaseException | None = None) -> None:
    """One line on stderr, from the first process only under a launcher, and the last one: the frames
    ``error`` passed through are let go first, so what they close (a progress bar) prints before it."""
    while error is not None:
        error.__traceback__ = None
        error = error.__cause__ or error.__context__
    gc.collect()
    if int(os.environ.get("RANK", "0")) == 0:
        print(line, file=sys.stderr, flush=True)


def count(text: str) -> int:
    """An argparse type: a whole number >= 1 (a refused one is argparse's one-line usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


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


