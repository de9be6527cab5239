"""Entry point of `python -m provq.data` and `provq-data` (see describe.py)."""

from provq.common.cli import command_name, run_command

from .describe import main


def entry() -> None:
    """The console command (``provq-data``) and ``python -m provq.data``."""
    raise SystemExit(run_command(command_name("python -m provq.data"), main))


if __name__ == "__main__":
    entry()
