"""One writer per output folder: a lock file that names its holder (process id, host, start time, command).

The lock is an ``flock`` on ``<folder>/.provq.lock``: the operating system lets it go when its
process ends, however it ends, so a lock file left behind by a killed process is noticed (its
flock is free) and taken over with a warning. Where the file system has no flock, a holder on
this host is checked by its process id. A command releases it (the file is removed) when it ends,
also by an error or a signal. Reading a folder needs no lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from provq.common.errors import FolderInUseError, UserError
from provq.common.files import writing
from provq.common.signals import max_over_processes

LOCK_NAME = ".provq.lock"
logger = logging.getLogger(__name__)


def _holder_text(holder: dict) -> str:
    command = str(holder.get("command", "?"))
    command = command if len(command) <= 80 else command[:77] + "..."  # the file has all of it
    return f"process {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}: {command}"


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16).decode("utf-8", "replace")
    try:
        holder = json.loads(text)
    except ValueError:
        return {"command": "unreadable lock file"} if text.strip() else {}
    return holder if isinstance(holder, dict) else {}


def _alive_here(holder: dict) -> bool:
    """Whether the holder is a running process of this host (a pid another user runs counts)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _flock(fd: int, holder: dict) -> bool:
    """Take the flock; False when another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as error:  # no flock on this file system: decide by the recorded holder
        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        return not (_alive_here(holder) or holder.get("host") not in (None, socket.gethostname()))
    return True


class FolderLock:
    """The lock of one output folder; ``acquire`` refuses (FolderInUseError naming the holder) or
    takes it, taking over a lock whose holder is gone with a warning."""

    def __init__(self, folder: str | os.PathLike, flag: str = "--output_dir", name: str = LOCK_NAME):
        self.folder, self.flag = Path(folder), flag
        self.path = self.folder / name
        self.fd: int | None = None
        self.created: list[Path] = []  # folders made for the lock, removed again if left empty

    def acquire(self) -> None:
        with writing(self.path, "the folder's lock file"):
            self.created = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
            self.folder.mkdir(parents=True, exist_ok=True)
            while self.fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    self._take(fd)
                except BaseException:
                    os.close(fd)
                    raise

    def _take(self, fd: int) -> None:
        holder = _read_holder(fd)
        if not _flock(fd, holder):
            raise FolderInUseError(
                f"{self.flag} {self.folder} is being written by another command ({_holder_text(holder)}); "
                f"wait for it to end or choose another folder (if that process is gone, delete {self.path})")
        if os.fstat(fd).st_ino != os.stat(self.path).st_ino:  # released and removed meanwhile: again
            os.close(fd)
            return
        holder = _read_holder(fd)  # as it is now that the lock is ours
        if holder:
            logger.warning("taking over %s: its holder (%s) no longer runs", self.path, _holder_text(holder))
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        """Remove the lock file (if still this lock's) and let the flock go; never raises."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                self.path.unlink()
        os.close(self.fd)
        self.fd = None
        with contextlib.suppress(OSError):  # a command that wrote nothing leaves nothing
            for folder in self.created:
                folder.rmdir()


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, state=None, flag: str = "--output_dir",
                name: str = LOCK_NAME) -> Iterator[None]:
    """Hold the lock of ``folder`` while inside. Under a launch (``state``: an Accelerator or
    PartialState) only the main process takes it, and every process learns whether it could,
    so all of them stop or none. ``name``: the lock file (a study's shards each have their own)."""
    main = state is None or state.is_main_process
    lock, refused = FolderLock(folder, flag, name), None
    if main:
        try:
            lock.acquire()
        except UserError as error:
            refused = error
    world = 1 if state is None else state.num_processes
    if max_over_processes(int(refused is not None), world, getattr(state, "device", "cpu")):
        raise refused or FolderInUseError(f"{flag} {folder}: the first process could not take its lock")
    try:
        yield
    finally:
        lock.release()
