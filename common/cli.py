"""Entry points: a user error ends a command with one line on stderr and exit status 2.

    if __name__ == "__main__":
        run_command("train_tokenizer.py", main)

``main(argv)`` raises typed errors like any library call; only the command line turns a
``UserError`` into ``<command>: error: <message>`` (printed by the first process alone under a
launcher) and exit status 2. Any other exception is a bug and keeps its traceback; so does a
user error when PROVQ_DEBUG=1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TypeVar

from common.errors import ConfigError, UserError

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
