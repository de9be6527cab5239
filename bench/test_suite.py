"""The test suite's wall time, before and after a change, on this machine: `make test-fast`'s and
`make test`'s pytest, each as a commit ran it.

    python -m bench.test_suite --before REV [--paths tests] [--out bench/results/test_suite.json]
    python -m bench.test_suite [--subsets full] --out bench/results/test_suite_now.json   (this tree only)

``before`` is REV checked out in a scratch git worktree and run with the commands its Makefile had
then (``--before_runner serial``: one pytest process, OMP_NUM_THREADS = the cores, as before 1fe6097;
``xdist``: the Makefile's runner now); ``after`` is this working tree with the
Makefile's commands now (one pytest-xdist worker per core, one thread each, slow tests first). The
four runs go one after another (before and after of the fast subset, then of the whole suite), on
the same machine with nothing else running, and share its caches (the emoji dataset, inductor's).
Without ``--before`` only this tree runs. Each "after" run also keeps pytest's 15 slowest test
phases (``slowest``), as `make test` prints them.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.results_io import write_result

REPO = Path(__file__).resolve().parents[1]
SERIAL = "OMP_NUM_THREADS={cores} {python} -m pytest -q -p no:cacheprovider"  # `make test` before xdist
XDIST = "OMP_NUM_THREADS=1 {python} -m pytest -q -p no:cacheprovider -n {cores} --dist worksteal"  # the Makefile's
SLOWEST = " --durations=15"  # the Makefile's too: the "after" runs keep them
SUBSETS = {"fast": '-m "not slow"', "full": ""}  # make test-fast's selection, make test's


def summary_line(output: str) -> dict:
    """pytest's last line, e.g. ``476 passed, 80 warnings in 416.94s``: the counts and its seconds."""
    line = output.strip().splitlines()[-1] if output.strip() else ""
    found = re.search(r"in ([\d.]+)s", line)
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", line)}
    return {"line": line, "pytest_s": float(found.group(1)) if found else None, **counts}


def slowest(output: str) -> list[dict]:
    """pytest's ``--durations`` table: each line ``12.34s call     tests/x.py::test_y`` as a row."""
    found = re.findall(r"^([\d.]+)s (call|setup|teardown) +(\S.*?)\s*$", output, flags=re.MULTILINE)
    return [{"seconds": float(seconds), "phase": phase, "test": test} for seconds, phase, test in found]


def run(command: str, cwd: Path) -> dict:
    started = time.time()
    done = subprocess.run(command, shell=True, cwd=cwd, capture_output=True, text=True)
    failed = [line.split(" - ")[0].removeprefix("FAILED ") for line in done.stdout.splitlines()
              if line.startswith("FAILED ")]
    python = Path(sys.executable)  # written as the clone names it, not as this machine's absolute path
    shown = python.relative_to(REPO).as_posix() if python.is_relative_to(REPO) else "python"
    durations = slowest(done.stdout)
    return {"command": command.replace(sys.executable, shown), "rc": done.returncode, "wall_s": round(time.time() - started, 1),
            **summary_line(done.stdout), **({"failed_tests": failed} if failed else {}),
            **({"slowest": durations} if durations else {})}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=None,
                        help="the commit to compare with (run in a scratch worktree); without it, this tree only")
    parser.add_argument("--paths", default="tests", help="what pytest collects (default: the suite)")
    parser.add_argument("--before_runner", default="serial", choices=("serial", "xdist"),
                        help="how the before commit's Makefile ran pytest: serial (before 1fe6097) or xdist")
    parser.add_argument("--subsets", default=",".join(SUBSETS), help=f"some of {', '.join(SUBSETS)}")
    parser.add_argument("--scratch", default=None, help="where the scratch worktree goes (default: the temp folder)")
    parser.add_argument("--out", default="bench/results/test_suite.json")
    args = parser.parse_args(argv)
    subsets = {name: SUBSETS[name] for name in args.subsets.split(",")}
    before_runner = SERIAL if args.before_runner == "serial" else XDIST
    cores = len(os.sched_getaffinity(0))
    fill = {"cores": cores, "python": sys.executable}
    after, results = XDIST.format(**fill) + SLOWEST, {}
    if args.before is None:
        for subset, selection in subsets.items():
            results[f"after_{subset}"] = run(f"{after} {selection} {args.paths}", REPO)
        return write_result({"benchmark": "test_suite", "before": None, "paths": args.paths, "cores": cores,
                             "results": results}, args.out)
    with tempfile.TemporaryDirectory(prefix="provq-before-", dir=args.scratch) as scratch:
        before = Path(scratch) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(before), args.before],
                       check=True)
        try:
            for subset, selection in subsets.items():
                results[f"before_{subset}"] = run(f"{before_runner.format(**fill)} {selection} {args.paths}", before)
                results[f"after_{subset}"] = run(f"{after} {selection} {args.paths}", REPO)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)], check=False)
    speedup = {subset: round(results[f"before_{subset}"]["pytest_s"] / results[f"after_{subset}"]["pytest_s"], 2)
               for subset in subsets if results[f"after_{subset}"]["pytest_s"]}
    return write_result({"benchmark": "test_suite", "before": args.before, "before_runner": args.before_runner, "paths": args.paths, "cores": cores,
                         "results": results,
                         "speedup": speedup}, args.out)


if __name__ == "__main__":
    main()
