"""Entry point of `python -m provq.data` and `provq-data` (see describe.py)."""

from provq.common.cli import run_command

from .describe import main

if __name__ == "__main__":
    raise SystemExit(run_command("python -m provq.data", main))
