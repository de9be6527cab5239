"""The project's error types: a ``UserError`` is something the user can fix; anything else is a bug.

The commands print a ``UserError`` as one line (``<command>: error: ...``, exit status 2, see
``common.cli``); library callers catch the same types. Each subclass is also the built-in type
it refines (``ValueError``, ``FileNotFoundError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """A bad flag value, a missing or wrong file, data that does not fit: fixable by the user."""


class ConfigError(UserError, ValueError):
    """A config field that does not exist, or a value of the wrong type or out of range."""


class FormatError(UserError, ValueError):
    """A saved file this version cannot use: truncated, not what its name says, or newer."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the command needs is not there."""


class StorageError(UserError, OSError):
    """A file could not be written: the disk is full, a quota is reached, or the folder is not writable."""


class FolderInUseError(UserError):
    """Another command is writing the output folder (its lock file names it)."""


class WrongFolderError(FormatError):
    """A folder of another kind than the one asked for (a prior where a tokenizer was wanted)."""
