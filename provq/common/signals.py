"""Stopping a long command cleanly: SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption).

``run_command`` installs the handlers. The first signal is only recorded; the command looks at its
next safe point (training: after an optimizer step; extraction: after a shard; sampling and
evaluation: after a batch; the drivers: between stages), finishes what it must (a checkpoint) and
raises ``Interrupted``, which ``run_command`` prints as one line before exiting 128 + the signal
(130 for SIGINT, 143 for SIGTERM). A second signal stops at once, wherever the command is (the
files it writes are atomic, so what is on disk stays usable), unless the command is already ending
(``ending``: its last line is being printed), where it only is recorded.

Under a launcher every process passes the same safe points and the decision is all-reduced there
(``agreed``), so no process is left waiting in a collective for one that stopped. Child commands
started by a driver (``forwarding``) get each signal the driver gets, once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A command stopped by a signal. A BaseException, as KeyboardInterrupt is, so that no
    ``except Exception`` on the way out takes it for an error."""

    def __init__(self, signum: int, message: str):
        self.signum, self.message = signum, message
        super().__init__(message)

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def interrupted(signum: int, where: str, *details: str) -> Interrupted:
    """``Interrupted`` saying where the command stopped: "interrupted at step 37 by SIGTERM; <details>"."""
    return Interrupted(signum, "; ".join((f"interrupted {where} by {signal_name(signum)}", *details)))


class _Received:
    owner: int | None = None  # the process whose handlers these are (not its forked workers)
    signals: list[int] = []
    ending = False  # the command is printing its last line: further signals are only recorded
    children: list = []  # subprocess.Popen objects that get every signal forwarded


def _handle(signum: int, frame) -> None:
    if os.getpid() != _Received.owner:  # a forked DataLoader worker: its parent decides
        return
    for child in _Received.children:
        if child.returncode is None:
            with contextlib.suppress(OSError):
                os.kill(child.pid, signum)
    _Received.signals.append(signum)
    if len(_Received.signals) > 1 and not _Received.ending:
        raise Interrupted(signum, f"stopped at once by a second signal ({signal_name(signum)})")


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """SIGINT and SIGTERM recorded (and a second one raising ``Interrupted``) while inside; the
    previous handlers come back after. Only the main thread can install handlers: elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _handle) for signum in STOP_SIGNALS}
    saved = _Received.owner, _Received.signals, _Received.ending
    _Received.owner, _Received.signals, _Received.ending = os.getpid(), [], False
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _Received.owner, _Received.signals, _Received.ending = saved


def ending() -> None:
    """The command is on its way out (its error or stop is being reported): a signal from now on is
    recorded but no longer raises, so it cannot cut the last line short or leave a traceback."""
    _Received.ending = True


def pending() -> int:
    """The first stop signal this process received (0: none)."""
    return _Received.signals[0] if _Received.signals else 0


def forced() -> bool:
    """Whether a second signal asked to stop at once."""
    return len(_Received.signals) > 1


def max_over_processes(value: int, world: int = 1, device="cpu") -> int:
    """The largest ``value`` over the processes of a launch (a collective: every process calls it).
    Without a process group (one process) it is ``value``."""
    import torch
    import torch.distributed as dist

    if world <= 1 or not (dist.is_available() and dist.is_initialized()):
        return value

    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def agreed(world: int = 1, device="cpu") -> int:
    """The signal every process stops for at this safe point: any process's (0: go on)."""
    return max_over_processes(pending(), world, device)


class SafePoints:
    """The safe points of a loop whose processes may hold different numbers of items."""

    def __init__(self, world: int = 1, device="cpu"):
        self.world, self.device = world, device
        self.signum = 0  # the signal the loop stopped for
        self.done = 0  # items this process finished

    def over(self, items: Iterable, rounds: int | None = None) -> Iterator:
        """This process's ``items``, each after a safe point that every process passes together:
        ``rounds`` of them (default: the most items any process has; needs ``len(items)``)."""
        if rounds is None:
            rounds = max_over_processes(len(items), self.world, self.device)
        source = iter(items)
        for _ in range(rounds):
            self.signum = agreed(self.world, self.device)
            if self.signum:
                return
            item = next(source, _END)
            if item is not _END:
                yield item
                self.done += 1


_END = object()


def pause(seconds: float, where: str) -> None:
    """``time.sleep`` that a stop signal ends: ``Interrupted`` saying it stopped ``where``."""
    end = time.monotonic() + seconds
    while not pending() and time.monotonic() < end:
        time.sleep(min(0.5, max(0.0, end - time.monotonic())))
    if pending():
        raise interrupted(pending(), where)


@contextlib.contextmanager
def forwarding(child) -> Iterator[None]:
    """Every stop signal this process gets, also sent to ``child`` (a subprocess.Popen started in its
    own session, so a terminal's Ctrl-C reaches it once, through here)."""
    _Received.children.append(child)
    try:
        yield
    finally:
        _Received.children.remove(child)
