"""Time to quality of the study's unit: the quality each training budget reaches per wall second.

    OMP_NUM_THREADS=1 python -m bench.time_to_quality [--seeds 3] [--arms base,batch16,steps200,warmup20]

Each arm is the study's unit (``cosine+kmeans+l2``, emoji 32 px, 1,024 codes, one thread: the tokenizer
run, then rFID on the test split, run by the study's own runner, provq.ablation.runner) on a preset of
its own: emoji32 with another batch / learning rate / warm-up, and its own step count. The arms run one after another in this process's core
(seed-major: every arm's seed s before seed s + 1, so a stopped bench holds whole paired blocks; rerun
the same command to continue, finished runs are kept). Seed s is the same initial weights in every arm.

What it writes: every run's wall seconds (tokenizer, rFID) and metrics; per arm the means; per arm
against ``base`` the paired differences of rFID, PSNR and usage with 95% t intervals and the ratio of
wall seconds. An arm "buys" runs per hour when it is faster and its intervals stay within the study's
margins of practical equivalence (docs/results/study_plan.yaml): descriptive here, 3 seeds decide nothing.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from bench.results_io import write_result
from provq.ablation import __main__ as ablation_main
from provq.ablation.runner import TOKENIZER_STAGES, Ablation, setting_of
from provq.ablation.statistics import paired_difference
from provq.ablation.variants import variant
from provq.common.presets import preset_path


@dataclass(frozen=True)
class Arm:
    batch: int = 32
    lr: float = 2.0e-3
    steps: int = 400
    warmup_steps: int = 100  # the preset's lr warm-up, in steps (a quarter of a 400-step run)
    eval_every: int = 50  # the study's: the test split's PSNR, usage and geometry every 50 steps

    def preset(self, path: Path) -> Path:
        """emoji32 with this arm's batch, learning rate and warm-up: the study's runner reads it as it
        reads any preset (the steps and the evaluation cadence are the runner's settings)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"base: {preset_path('emoji32').resolve()}\ntokenizer:\n  train: {{batch_size: {self.batch}, "
                        f"lr: {self.lr}, warmup_steps: {self.warmup_steps}}}\n")
        return path


ARMS = {
    "base": Arm(),  # today's unit: emoji32's batch and lr, 400 steps
    "batch16": Arm(batch=16),  # half the images a step: about half the seconds
    "steps200": Arm(steps=200, warmup_steps=50),  # half the steps, the warm-up scaled with them
    "batch16_lr3e-3": Arm(batch=16, lr=3.0e-3),
    "warmup20": Arm(warmup_steps=20),  # the same seconds as base, a fifth of its lr warm-up
    "eval_once": Arm(eval_every=400),  # base's training, its test-split evaluation at the end only
}
VARIANT = "cosine+kmeans+l2"
KEPT = ("psnr", "rfid", "ssim", "codebook_usage", "codebook_perplexity")
COMPARED = ("rfid", "psnr", "codebook_usage")


def run_one(work: Path, arm: str, seed: int) -> dict:
    """Train and evaluate one arm x seed with the study's runner (its stages skipped where their files
    exist); its seconds per stage and metrics."""
    chosen, folder = ARMS[arm], work / arm
    args = ablation_main.build_parser().parse_args([
        "--config", str(chosen.preset(folder / "preset.yaml")), "--dataset", "emoji", "--resolution", "32",
        "--steps", str(chosen.steps), "--codebook_size", "1024", "--variants", VARIANT,
        "--no_generation", "--no_train_pixels", "--output_dir", str(folder)])
    ablation = Ablation(args, replace(setting_of(args), eval_every=chosen.eval_every), folder)
    metrics = ablation.train_and_evaluate(variant(VARIANT), seed)
    name = str(ablation.folder(variant(VARIANT), seed).relative_to(folder))
    seconds = {stage: ablation.timings[f"{name}: {stage}"] for stage in TOKENIZER_STAGES
               if f"{name}: {stage}" in ablation.timings}
    return {"seconds": seconds, "metrics": {key: metrics[key] for key in KEPT if key in metrics}}


def summary(runs: dict[str, dict[int, dict]]) -> dict:
    """Per arm: mean seconds and metrics; against base: paired differences and the seconds' ratio."""
    out = {}
    for arm, by_seed in runs.items():
        seeds = sorted(by_seed)
        wall = [sum(by_seed[s]["seconds"].values()) for s in seeds]
        row = {"seeds": seeds, "wall_s_mean": round(sum(wall) / len(wall), 1),
               "tokenizer_s_mean": round(sum(by_seed[s]["seconds"].get("tokenizer", 0) for s in seeds) / len(seeds), 1),
               **{f"{k}_mean": sum(by_seed[s]["metrics"][k] for s in seeds) / len(seeds) for k in COMPARED}}
        common = [s for s in seeds if s in runs.get("base", {})]
        if arm != "base" and len(common) >= 2:
            row["minus_base"] = {}
            for key in COMPARED:
                d = paired_difference([by_seed[s]["metrics"][key] for s in common],
                                      [runs["base"][s]["metrics"][key] for s in common])
                row["minus_base"][key] = {"mean": d.mean, "ci95": [d.low, d.high], "n": d.seeds}
            base_wall = sum(sum(runs["base"][s]["seconds"].values()) for s in common)
            row["wall_ratio_to_base"] = round(sum(sum(by_seed[s]["seconds"].values()) for s in common) / base_wall, 3)
        out[arm] = row
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default="base,batch16,steps200,warmup20", help=f"some of {', '.join(ARMS)}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first_seed", type=int, default=200, help="seeds no study version uses")
    parser.add_argument("--work", default="runs/bench_time_to_quality", help="the runs (kept: rerun to continue)")
    parser.add_argument("--out", default="bench/results/time_to_quality.json")
    args = parser.parse_args(argv)
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}; known: {', '.join(ARMS)}")
    work, started = Path(args.work), time.time()
    runs: dict[str, dict[int, dict]] = {arm: {} for arm in arms}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for arm in arms:
            runs[arm][seed] = run_one(work, arm, seed)
    return write_result({
        "benchmark": "time_to_quality",
        "unit": f"{VARIANT}, emoji 32 px, 1,024 codes, one thread: tokenizer, then rFID on the test split",
        "arms": {arm: vars(ARMS[arm]) for arm in arms},
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "note": "runs one after another on one core; another process may hold the other core "
                "(the study): compare the arms with each other",
        "minutes": round((time.time() - started) / 60, 1),
        "summary": summary(runs),
        "runs": {arm: {str(s): r for s, r in by_seed.items()} for arm, by_seed in runs.items()},
    }, args.out)


if __name__ == "__main__":
    main()
