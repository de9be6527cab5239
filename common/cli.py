"""Entry points: a user error ends a command with one line on stderr and exit status 2; a signal
with one line saying where it stopped and how to continue, and exit status 130 (SIGINT) or 143 (SIGTERM).

    if __name__ == "__main__":
        run_command("train_tokenizer.py", main, resume="resume with --resume latest")

``main(argv)`` raises typed errors like any library call; only the command line turns a
``UserError`` into ``<command>: error: <message>`` (printed by the first process alone under a
launcher) and exit status 2, and a full disk or an unwritable file met anywhere into the same.
Any other exception is a bug and keeps its traceback; so does a user error when PROVQ_DEBUG=1.
SIGINT and SIGTERM are handled as ``common.signals`` describes.
"""

from __future__ import annotations

import argparse
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


def run_command(command: str, main: Callable[..., T], argv: list[str] | None = None, resume: str = "") -> T:
    """``main(argv)``, with user errors as one line and exit status 2, and a stop by SIGINT or
    SIGTERM as one line ending in ``resume`` (how to continue) and exit status 128 + the signal."""
    debug = os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    with signals.handled():
        try:
            return main(argv)
        except UserError as error:
            if debug:
                raise
            say(user_error_line(command, error), error)
            raise SystemExit(2) from None
        except signals.Interrupted as stop:
            say(f"{command}: {stop.message}" + (f"; {resume}" if resume else ""), stop)
            raise SystemExit(stop.exit_status) from None
        except OSError as error:  # a full disk or an unwritable file where no writer named it
            cause = storage_cause(error)
            if cause is None or debug:
                raise
            say(f"{command}: error: {error.filename}: {cause}" if error.filename else f"{command}: error: {cause}", error)
            raise SystemExit(2) from None
        except Exception:
            if not signals.forced():
                raise
            # Stopped at once under a launcher: a peer that left a collective is not a bug.
            say(f"{command}: stopped at once by a second signal" + (f"; {resume}" if resume else ""))
            raise SystemExit(128 + signals.pending()) from None


def say(line: str, error: BaseException | None = None) -> None:
    """One line on stderr, from the first process only under a launcher, and the last one: the frames
    ``error`` passed through are let go first, so what they close (a progress bar) prints before it."""
    while error is not None:
        error.__traceback__ = None
        error = error.__cause__ or error.__context__
    gc.collect()
    if int(os.environ.get("RANK", "0")) == 0:
        print(line, file=sys.stderr, flush=True)
