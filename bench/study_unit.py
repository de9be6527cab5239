"""The study's unit, timed: one tokenizer run of the study (emoji 32 px, 1,024 codes, 400 steps, one
thread) and its rFID evaluation, exactly as `python -m provq.ablation --ledger ...` runs it, eager and
compiled (--compile) side by side, and the runs per hour each gives.

    python -m bench.study_unit [--steps 400] [--variant cosine+kmeans+l2] [--out bench/results/study_unit.json]

The two arms start together, each a one-thread process on its own core: the study's way of using a
two-core machine, so the figures include what two runs cost each other. Before the timed runs, a 2-step
run of each arm fills what every study run after a machine's first finds ready: the decoded dataset,
the test split's Inception statistics, inductor's compile cache. Runs per hour = the arms that fit on the
machine at once (one per core) x 3600 / the arm's wall seconds. The same seed in both arms: the metrics
show what compiling changes in the result (the last bits of each step, and so the trajectory).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.results_io import write_result

ARMS = {"eager": (), "compiled": ("--compile",)}
KEPT = ("psnr", "rfid", "ssim", "codebook_usage", "codebook_perplexity")


def ablation(folder: Path, args, extra: tuple[str, ...]) -> subprocess.Popen:
    command = [sys.executable, "-m", "provq.ablation", "--no_generation", "--no_train_pixels", "--seeds", "1",
               "--steps", str(args.steps), "--codebook_size", "1024", "--variants", args.variant,
               "--dataset", args.dataset, "--resolution", str(args.resolution), "--config", args.config,
               "--output_dir", str(folder), *extra]
    log = (folder.parent / f"{folder.name}.log").open("w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def finished(process: subprocess.Popen, folder: Path) -> None:
    if process.wait() != 0:
        raise SystemExit(f"{folder}: the ablation failed (exit {process.returncode}); see {folder.parent / folder.name}.log")


def measured(folder: Path, variant: str, wall: float) -> dict:
    timings = json.loads((folder / "timings.json").read_text())
    metrics = json.loads((folder / variant / "seed0" / "rfid.json").read_text())["metrics"]
    return {"wall_s": round(wall, 1),
            "stages_s": {name.split(": ")[-1]: round(seconds, 1) for name, seconds in timings.items()},
            "metrics": {key: metrics[key] for key in KEPT if key in metrics}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--variant", default="cosine+kmeans+l2")
    parser.add_argument("--dataset", default="emoji", help="the study's (emoji); tests pass a tiny folder")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--config", default="emoji32", help="the study's preset (bf16: a CPU without bf16 units "
                                                            "refuses it); tests pass an fp32 one")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"some of {', '.join(ARMS)} (default: both)")
    parser.add_argument("--work", default="runs/bench_study_unit", help="scratch folder (emptied first)")
    parser.add_argument("--out", default="bench/results/study_unit.json")
    args = parser.parse_args(argv)
    chosen = {arm: ARMS[arm] for arm in args.arms.split(",")}
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for arm, extra in chosen.items():  # one at a time: the warm-ups share the caches they fill
        folder = work / f"warm_{arm}"
        finished(ablation(folder, argparse.Namespace(**{**vars(args), "steps": 2}), extra), folder)
    load_before = os.getloadavg()
    started, processes = time.time(), {}
    for arm, extra in chosen.items():
        processes[arm] = ablation(work / arm, args, extra)
    walls = {}
    for arm, process in processes.items():
        finished(process, work / arm)
        walls[arm] = time.time() - started
    at_once = min(2, os.cpu_count() or 1)  # the study's two one-thread shards
    arms = {arm: measured(work / arm, args.variant, walls[arm]) for arm in chosen}
    for found in arms.values():
        found["runs_per_hour"] = round(at_once * 3600 / found["wall_s"], 2)
    result = {
        "benchmark": "study_unit",
        "config": args.config,
        "unit": f"{args.variant}, {args.dataset} {args.resolution} px, 1,024 codes, {args.steps} steps, one thread, then rFID on the test "
                "split (python -m provq.ablation --no_generation --no_train_pixels)",
        "arms": {arm: " ".join(extra) or "(default)" for arm, extra in chosen.items()},
        "concurrent_runs": len(chosen), "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "results": arms,
    }
    if len(arms) == len(ARMS):
        result["speedup_compiled"] = round(arms["eager"]["wall_s"] / arms["compiled"]["wall_s"], 3)
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
