"""Entry points: a user error ends a command with one line on stderr and exit status 2; a signal
with one line saying where it stopped and how to continue, and exit status 130 (SIGINT) or 143 (SIGTERM).

    if __name__ == "__main__":
        run_command("train_tokenizer.py", main, resume="resume with --resume latest")

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
import gc
import os
import sys
from collections.abc import Callable
from typing import TypeVar

from common import signals
from common.errors import ConfigError, UserError
from common.files import storage_cause

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


def run_command(command: str, main: Callable[..., T], argv: list[str] | None = None, resume: str | None = None) -> T:
    """``main(argv)``, with user errors (and a full disk met anywhere) as one line and exit status 2.

    ``resume`` (how the command continues after a stop) says it has safe points: SIGINT and SIGTERM
    then stop it at the next one (``common.signals``) with one line ending in ``resume`` and exit
    status 128 + the signal. Without it, Ctrl-C stops the command at once, in one line too."""
    with signals.handled() if resume is not None else contextlib.nullcontext():
        try:
            return main(argv)
        except BaseException as error:
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
