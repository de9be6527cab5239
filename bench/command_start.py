"""How long each console command takes to answer --help, in this tree and at an earlier commit, side by side.

    python -m bench.command_start --before REV [--repeats 3] [--out bench/results/command_start.json]

Every ``[project.scripts]`` entry of pyproject.toml is run as ``python -c "<its entry>()" --help`` (what the
installed script does) from this tree and from REV checked out in a scratch git worktree, alternately, the
best of ``--repeats`` each; one thread (OMP_NUM_THREADS=1). What it measures is the imports a command
does before it parses its arguments: the same seconds a typo in a flag costs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomllib

from bench.results_io import write_result

REPO = Path(__file__).resolve().parents[1]


def answer_seconds(tree: Path, target: str) -> float:
    module, function = target.split(":")
    code = f"import sys; sys.argv = ['cmd', '--help']; from {module} import {function}; {function}()"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0 or "usage:" not in done.stdout:
        raise SystemExit(f"{target} --help failed in {tree}: {done.stderr[-2000:]}")
    return seconds


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the commit to compare with (run in a scratch worktree)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--commands", default=None, help="some of the console commands (default: all)")
    parser.add_argument("--scratch", default=None, help="where the scratch worktree goes (default: the temp folder)")
    parser.add_argument("--out", default="bench/results/command_start.json")
    args = parser.parse_args(argv)
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    if args.commands:
        scripts = {name: scripts[name] for name in args.commands.split(",")}
    results = {}
    with tempfile.TemporaryDirectory(prefix="provq-before-", dir=args.scratch) as scratch:
        before = Path(scratch) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(before), args.before],
                       check=True)
        try:
            for name, target in scripts.items():
                times = {"before": [], "after": []}
                for _ in range(args.repeats):  # alternately, so a busy moment hits both
                    times["before"].append(answer_seconds(before, target))
                    times["after"].append(answer_seconds(REPO, target))
                best = {side: min(values) for side, values in times.items()}
                results[name] = {"before_s": round(best["before"], 2), "after_s": round(best["after"], 2),
                                 "speedup": round(best["before"] / best["after"], 2)}
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)], check=False)
    total = {side: round(sum(r[f"{side}_s"] for r in results.values()), 2) for side in ("before", "after")}
    return write_result({"benchmark": "command_start", "before": args.before, "repeats": args.repeats,
                         "load_average_before": [round(x, 2) for x in os.getloadavg()],
                         "commands": results, "total_s": total}, args.out)


if __name__ == "__main__":
    main()
