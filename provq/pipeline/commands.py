"""The user-facing commands of both stages as values, built and run by the demo and the ablation.

Each stage runs as its own process, exactly the command a user would type, so
every stage can be rerun, resumed or checked by hand; a stage whose output
file exists is not run again. SIGINT and SIGTERM reach the stage's process once
(forwarded: it runs in its own session) and stop it at its safe point; the
driver then stops too, and no stage starts after a signal.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from provq.common import signals
from provq.common.errors import UserError


@dataclass(frozen=True)
class StageCommand:
    """A script and its arguments: run as a process, or in this process via ``module.main(argv)``."""

    module: str  # the command's module: provq.commands.train_tokenizer, ..., eval, provq.data
    argv: tuple[str, ...]

    def command(self) -> list[str]:
        return [sys.executable, "-m", self.module, *self.argv]

    def main_module(self) -> str:
        """The module whose ``main(argv)`` runs the command (a package's is its ``__main__``)."""
        return f"{self.module}.__main__" if self.module in PACKAGES else self.module


PACKAGES = ("eval", "provq.data")
COMMANDS = "provq.commands."


def train_tokenizer(config: str, output_dir: Path, *overrides: str) -> StageCommand:
    return StageCommand(COMMANDS + "train_tokenizer", ("--config", config, "--output_dir", str(output_dir),
                                    "--resume", "latest", *overrides))


def extract_codes(tokenizer: Path, config: str, output_dir: Path, *overrides: str) -> StageCommand:
    return StageCommand(COMMANDS + "extract_codes", ("--tokenizer", str(tokenizer), "--config", config,
                                  "--output_dir", str(output_dir), *overrides))


def train_prior(config: str, codes: Path, output_dir: Path, *overrides: str) -> StageCommand:
    return StageCommand(COMMANDS + "train_prior", ("--config", config, "--codes", str(codes), "--output_dir",
                                str(output_dir), "--resume", "latest", *overrides))


def sample(tokenizer: Path, prior: Path, config: str, output_dir: Path, num_images: int,
           *extra: str) -> StageCommand:
    return StageCommand(COMMANDS + "sample", ("--tokenizer", str(tokenizer), "--prior", str(prior), "--config", config,
                                   "--num_images", str(num_images), "--output_dir", str(output_dir), *extra))


def evaluate(command: str, *args: str) -> StageCommand:
    return StageCommand("eval", (command, *args))


def data_describe(*args: str) -> StageCommand:
    return StageCommand("provq.data", ("describe", *args))


def cfg_flag(scale: float | None) -> list[str]:
    """``--cfg_scale X`` for a chosen scale; nothing for None, which leaves sample.py's default
    (generator.sampling.DEFAULT_CFG_SCALE)."""
    return [] if scale is None else ["--cfg_scale", str(scale)]


def run_unless_done(name: str, command: StageCommand, done: Path, timings: dict | None = None,
                    capture_to: Path | None = None, in_process: bool = False) -> bool:
    """Run ``command`` unless its output ``done`` exists; returns whether it ran. Output streams through.

    ``in_process`` saves the interpreter start and imports (~5-10 s a stage on
    two cores), which adds up over the ablation's dozens of runs.
    """
    if done.exists():
        print(f"[{name}] already done ({done}), skipping", flush=True)
        return False
    if signals.pending():
        raise signals.interrupted(signals.pending(), f"before the stage {name!r}")
    print(f"\n[{name}] {' '.join(command.command()[1:])}", flush=True)
    start = time.time()
    if in_process:
        importlib.import_module(command.main_module()).main(list(command.argv))
    else:
        output = run_process(name, command, capture=capture_to is not None)
        if capture_to is not None:  # commands that print their result as JSON on stdout
            capture_to.parent.mkdir(parents=True, exist_ok=True)
            capture_to.write_text(output)
            print(output, flush=True)
    if timings is not None:
        timings[name] = round(time.time() - start, 1)
    return True


def run_process(name: str, command: StageCommand, capture: bool = False) -> str | None:
    """The stage as a process in its own session, with this process's stop signals forwarded to it;
    its output when ``capture``. A stage stopped by a signal stops the driver (``Interrupted``); one
    that ended with a user error (it printed the line) is a ``UserError`` naming the stage."""
    out = subprocess.PIPE if capture else None
    with subprocess.Popen(command.command(), stdout=out, text=True, start_new_session=True) as process, \
            signals.forwarding(process):
        output, _ = process.communicate()
    code = process.returncode
    if code in (130, 143) or (code and signals.pending()):
        raise signals.interrupted(signals.pending() or code - 128, f"in the stage {name!r}")
    if code == 2:
        raise UserError(f"the stage {name!r} stopped with the error above ({' '.join(command.command()[1:])})")
    if code:
        raise subprocess.CalledProcessError(code, process.args)
    return output
