"""Entry point of `python -m data` (see data/describe.py)."""

from common.cli import run_command

from .describe import main

if __name__ == "__main__":
    raise SystemExit(run_command("python -m data", main))
