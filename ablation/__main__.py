"""ProVQ versus hard VQ on one budget, and a scale sweep: python -m ablation [--quick | --sweep] [...].

Trains tokenizers that differ only in how discretization arrives (schedule, k-means init, l2
codes, mechanism) over several seeds, evaluates each with hard quantization (rFID, PSNR and SSIM
on every test image, PSNR and SSIM on every training image, usage, perplexity) and, for seed 0
(every seed with --full), a fixed-budget prior (gFID); writes ``<output_dir>/report.md`` with
paired verdicts. ``--sweep`` repeats three variants at several codebook sizes and budgets.
A finished variant x seed is never retrained: rerunning continues where it stopped (also after
Ctrl-C or SIGTERM, which stop the stage at its next safe point; a training writes its checkpoint).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ablation.report import strongest, write_report, write_sweep_report
from ablation.variants import DEFAULT, QUICK, SWEEP, Variant, select
from common.cli import CommandParser, run_command
from common.errors import ConfigError
from common.files import write_json_atomic
from common.locks import LOCK_NAME, output_lock
from common.signals import pause
from pipeline import commands
from pipeline.report import read_jsonl


@dataclass(frozen=True)
class Setting:
    seeds: int
    tokenizer_steps: int
    prior_steps: int
    num_samples: int
    eval_every: int
    variants: tuple[str, ...]
    codebook_size: int = 1024
    generation: bool = True  # the prior and gFID (seed 0, or every seed with --full)
    train_pixels: bool = True  # PSNR and SSIM on every training image too


SETTINGS = {
    # a smoke check of the whole machinery (every stage, the comparisons), not a result
    "quick": Setting(seeds=1, tokenizer_steps=30, prior_steps=30, num_samples=100, eval_every=10,
                     variants=QUICK),
    "default": Setting(seeds=3, tokenizer_steps=400, prior_steps=400, num_samples=500, eval_every=50,
                       variants=DEFAULT),
}
# The sweep's points (codebook size, steps): each with SWEEP's variants x 3 seeds, no gFID.
SWEEP_POINTS = ((1024, 400), (1024, 2000), (16384, 400))
SWEEP_LARGE = (16384, 2000)


class Ablation:
    """The runs of one setting under ``out``, each stage run unless its output exists."""

    def __init__(self, args, setting: Setting, out: Path):
        self.args, self.setting, self.out = args, setting, out
        # gFID's reference: the training split; --quick uses the test split (its statistics are in the
        # statistics cache once an rFID ran).
        self.ref_split = "test" if args.quick else "train"
        self.ref = out / "ref" / f"{self.ref_split}_stats.npz"
        # Seconds per stage, recorded by the invocation that ran it: the report's time is
        # then the whole ablation's, however many times it was resumed.
        self.timings_path = out / "timings.json"
        self.timings = json.loads(self.timings_path.read_text()) if self.timings_path.exists() else {}
        self.stages: list[str] = []

    def folder(self, variant: Variant, seed: int) -> Path:
        return self.out / variant.name / f"seed{seed}"

    def run(self, name, command, done) -> None:
        self.stages.append(name)
        ran = {}
        if commands.run_unless_done(name, command, done, ran, in_process=not self.args.subprocess):
            # Merged into what is on disk: the shards of a study share the file.
            on_disk = json.loads(self.timings_path.read_text()) if self.timings_path.exists() else {}
            self.timings = {**self.timings, **on_disk, **ran}
            self.timings_path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.timings_path, self.timings)
        elif name not in self.timings and self.timings_path.exists():
            self.timings.update(json.loads(self.timings_path.read_text()))

    def time_summary(self, started: float) -> dict:
        stages = list(dict.fromkeys(self.stages))  # a stage's result may be read more than once
        timed = [self.timings[name] for name in stages if name in self.timings]
        return {"stage_minutes": round(sum(timed) / 60, 1), "stages": len(stages),
                "untimed_stages": len(stages) - len(timed),
                "minutes": round((time.time() - started) / 60, 1)}

    def data(self) -> tuple[str, ...]:
        return ("--data.dataset", self.args.dataset, "--data.resolution", str(self.args.resolution))

    def reference(self) -> None:
        self.run("reference stats", commands.evaluate(
            "stats", "--dataset", self.args.dataset, "--split", self.ref_split, "--resolution",
            str(self.args.resolution), "--out", str(self.ref)), self.ref)

    def tokenizer(self, variant: Variant, seed: int) -> dict:
        """Train one variant x seed and evaluate it: test rFID/PSNR/SSIM, train PSNR/SSIM."""
        run, s = self.folder(variant, seed), self.setting
        overrides = (*self.data(), "--tokenizer.model.resolution", str(self.args.resolution),
                     "--seed", str(seed), "--max_steps", str(s.tokenizer_steps),
                     "--tokenizer.train.eval_every", str(s.eval_every),
                     "--tokenizer.train.image_every", str(s.tokenizer_steps),
                     "--tokenizer.train.save_every", str(max(s.eval_every, s.tokenizer_steps // 4)),
                     *variant.overrides(s.codebook_size))
        tok, name = run / "tok" / "tokenizer", str(run.relative_to(self.out))
        self.run(f"{name}: tokenizer", commands.train_tokenizer(self.args.config, run / "tok", *overrides),
                 tok / "model.safetensors")
        evaluate = ("--tokenizer", str(tok), "--dataset", self.args.dataset, "--lpips_net", "none")
        self.run(f"{name}: rFID", commands.evaluate("rfid", *evaluate, "--split", "test", "--out",
                                                    str(run / "rfid.json")), run / "rfid.json")
        metrics = {**json.loads((run / "rfid.json").read_text())["metrics"], **last_geometry(run / "tok")}
        if not s.train_pixels:
            return metrics
        self.run(f"{name}: train pixels", commands.evaluate(
            "rfid", *evaluate, "--split", "train", "--pixel_only", "--out", str(run / "train_pixels.json")),
            run / "train_pixels.json")
        train = json.loads((run / "train_pixels.json").read_text())["metrics"]
        return {**metrics, "train_psnr": train["psnr"], "train_ssim": train["ssim"]}

    def generation(self, variant: Variant, seed: int) -> dict:
        run, s, cfg = self.folder(variant, seed), self.setting, self.args.config
        tok, name = run / "tok" / "tokenizer", str(run.relative_to(self.out))
        self.run(f"{name}: codes", commands.extract_codes(tok, cfg, run / "codes", "--flip_copies", *self.data()),
                 run / "codes" / "tokenizer.json")
        self.run(f"{name}: prior", commands.train_prior(
            cfg, run / "codes", run / "prior", "--seed", str(seed), "--max_steps", str(s.prior_steps),
            "--prior.train.image_every", str(s.prior_steps), "--prior.train.save_every",
            str(s.prior_steps)), run / "prior" / "prior" / "model.safetensors")
        self.run(f"{name}: samples", commands.sample(
            tok, run / "prior" / "prior", cfg, run / "samples", s.num_samples,
            "--cfg_scale", str(self.args.cfg_scale), "--seed", str(seed)), run / "samples" / "samples.npz")
        wait_for(self.ref, "the reference statistics (another shard computes them)")
        self.run(f"{name}: gFID", commands.evaluate(
            "gfid", "--samples", str(run / "samples" / "samples.npz"), "--ref", str(self.ref),
            "--out", str(run / "gfid.json")), run / "gfid.json")
        return {**json.loads((run / "gfid.json").read_text())["metrics"], **prior_measures(run)}

    def all_runs(self, variants: list[Variant]) -> tuple[dict, dict]:
        s = self.setting
        if s.generation:
            self.reference()
        results = {v.name: [self.tokenizer(v, seed) for seed in range(s.seeds)] for v in variants}
        gen_seeds = range(s.seeds) if self.args.full else range(1)
        generation = {v.name: [self.generation(v, seed) for seed in gen_seeds] for v in variants} \
            if s.generation else {}
        return results, generation


def wait_for(path: Path, what: str, seconds: float = 30) -> None:
    """Until ``path`` exists (another shard of a study writes it); at once when it does."""
    while not path.exists():
        print(f"[ablation] waiting for {what}: {path}", flush=True)
        pause(seconds, f"while waiting for {what}")


def prior_measures(run: Path) -> dict:
    """The prior's validation negative log-likelihood in bits per code and per image (test-split
    codes, at its last validation), and its samples' code-grid diversity against the training codes."""
    import math

    import numpy as np
    import torch

    from eval.metrics import code_grid_diversity
    from generator import CodeDataset

    rows = [r for r in read_jsonl(run / "prior" / "metrics.jsonl") if "val/loss" in r]
    train = CodeDataset(run / "codes", "train")
    grid = train.code_shape[0] * train.code_shape[1]
    measures = {}
    if rows:
        bits = rows[-1]["val/loss"] / math.log(2)
        measures = {"bits_per_code": bits, "bits_per_image": bits * grid}
    with np.load(run / "samples" / "samples.npz") as samples:
        if "codes" in samples.files:
            originals = torch.from_numpy(train.codes[:, 0].astype(np.int64))  # not the flip copies
            measures.update(code_grid_diversity(torch.from_numpy(samples["codes"]), originals))
    return measures


def last_geometry(run: Path) -> dict:
    """The effective dimension of z_e and of the used codes at the run's last evaluation."""
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "eval/dim_latents" in r]
    return {"dim_latents": rows[-1]["eval/dim_latents"], "dim_codes": rows[-1]["eval/dim_codes"]} if rows else {}


def setting_of(args) -> Setting:
    """The named setting with the command line's overrides."""
    setting = SETTINGS["quick" if args.quick else "default"]
    changes = {k: v for k, v in (("seeds", args.seeds), ("tokenizer_steps", args.steps),
                                 ("prior_steps", args.prior_steps), ("num_samples", args.num_samples),
                                 ("codebook_size", args.codebook_size)) if v is not None}
    if args.variants:
        changes["variants"] = tuple(v.name for v in select(args.variants))
    for name in ("seeds", "tokenizer_steps", "prior_steps", "num_samples"):
        if changes.get(name, 1) < 1:
            raise ConfigError(f"--{ {'tokenizer_steps': 'steps'}.get(name, name)} must be >= 1")
    return replace(setting, **changes)


def run_ablation(args, started: float) -> Path:
    setting = setting_of(args)
    out = output_folder(args)
    ablation = Ablation(args, setting, out)
    variants = select(setting.variants)
    results, generation = ablation.all_runs(variants)
    return write_report(out, variants, results, generation,
                        {"setting": asdict(setting), "dataset": args.dataset, "config": args.config,
                         "gfid_reference": f"{ablation.ref_split} split", **ablation.time_summary(started),
                         "full": args.full})


def sweep_settings(args) -> list[Setting]:
    """The sweep's points as settings: SWEEP_POINTS (and SWEEP_LARGE with --sweep_large)."""
    base = setting_of(args)
    names = tuple(v.name for v in select(args.variants or SWEEP))
    # Traded for time (90 minutes on 2 cores): no gFID, no training-split metrics, 8 eval points.
    return [replace(base, codebook_size=codebook, tokenizer_steps=steps, generation=False, train_pixels=False,
                    eval_every=max(50, steps // 8), variants=names)
            for codebook, steps in (*SWEEP_POINTS, *((SWEEP_LARGE,) if args.sweep_large else ()))]


def run_sweep(args, started: float) -> Path:
    """SWEEP's variants at each (codebook size, steps), 3 seeds, no gFID; one report with the paired
    difference best ProVQ minus best hard VQ against size and budget."""
    out = output_folder(args)
    variants = select(args.variants or SWEEP)
    points, summary = [], {}
    for setting in sweep_settings(args):
        codebook, steps = setting.codebook_size, setting.tokenizer_steps
        ablation = Ablation(args, setting, out / f"k{codebook}_s{steps}")
        results, _ = ablation.all_runs(variants)
        points.append({"codebook_size": codebook, "steps": steps, "label": f"{codebook} codes, {steps} steps",
                       "results": results, "provq": strongest(variants, results, lambda v: v.smooth).name,
                       "hard": strongest(variants, results, lambda v: v.hard).name})
        for key, value in ablation.time_summary(started).items():
            summary[key] = summary.get(key, 0) + value if key != "minutes" else value
    return write_sweep_report(out, points, summary)


def run_study(args, started: float) -> Path:
    """The study (ablation/study.py): every phase, or this shard's share, then the report."""
    from ablation.study import Study, StudyPlan, study_families
    from ablation.study_report import write_study_report

    out = output_folder(args)
    shard, shards = parse_shard(args.shard)
    base = setting_of(args)
    resolutions = (args.resolution, 2 * args.resolution) if args.study_high_resolution else (args.resolution,)
    plan = StudyPlan(seeds=base.seeds, resolutions=resolutions, generation=args.study_generation,
                     generation_at_high=args.study_high_generation, shard=shard, shards=shards,
                     families=study_families(args.variants))
    setting = replace(base, train_pixels=False)  # traded for time: test-split metrics only
    study = Study(args, setting, plan, out)
    found = study.run()
    minutes = {key: sum(a.time_summary(started)[key] for a in study.ablations.values())
               for key in ("stage_minutes", "stages", "untimed_stages")}
    description = (f"Dataset `{args.dataset}`, preset `{args.config}`, about {setting.codebook_size} codes "
                   f"(FSQ levels and LFQ bits for that count), {setting.tokenizer_steps} tokenizer steps, "
                   f"priors of {setting.prior_steps} steps with {setting.num_samples} samples for gFID "
                   f"against the training split; resolutions {', '.join(map(str, plan.resolutions))} px; "
                   + (f"generation at {plan.resolutions[0]} px"
                      f"{' and above' if plan.generation_at_high else ' only'}." if plan.generation
                      else "no generation (--study_generation false)."))
    return write_study_report(out, plan.variants, found, {
        "description": description, "seeds": plan.seeds, **minutes,
        "minutes": round((time.time() - started) / 60, 1)})


def output_folder(args) -> Path:
    default = ("runs/study" if args.study else "runs/ablation_sweep" if args.sweep
               else "runs/ablation_quick" if args.quick else "runs/ablation")
    return Path(args.output_dir or default)


def parse_shard(text: str) -> tuple[int, int]:
    try:
        shard, shards = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected i/n, e.g. 0/2") from None
    if not 0 <= shard < shards:
        raise ConfigError(f"--shard {text!r}: i must be in [0, n)")
    return shard, shards


def _yes_no(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m ablation", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/emoji32.yaml")
    parser.add_argument("--dataset", default="emoji", help="emoji, a hub dataset name or a folder")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--output_dir", default=None,
                        help="default: runs/ablation (runs/ablation_quick, runs/ablation_sweep)")
    parser.add_argument("--quick", action="store_true", help="1 seed, tiny budgets: a smoke check")
    parser.add_argument("--sweep", action="store_true",
                        help=f"{', '.join(SWEEP)} x 3 seeds at (codes, steps) {SWEEP_POINTS}")
    parser.add_argument("--sweep_large", action="store_true", help=f"with --sweep: also {SWEEP_LARGE}")
    parser.add_argument("--variants", default=None,
                        help="comma-separated variant names (see ablation/variants.py); with --study, the "
                             "study's variants to run (each family: its hard codes and one or more others)")
    parser.add_argument("--steps", type=int, default=None, help="tokenizer steps per run")
    parser.add_argument("--prior_steps", type=int, default=None, help="prior steps per generation run")
    parser.add_argument("--num_samples", type=int, default=None, help="samples per generation run (gFID)")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--codebook_size", type=int, default=None)
    parser.add_argument("--full", action="store_true", help="gFID for every seed, not only seed 0")
    parser.add_argument("--cfg_scale", type=float, default=2.0)
    parser.add_argument("--study", action="store_true",
                        help="the study: every family's hard, switch and ramp variants, generation, 64 px "
                             "(ablation/study.py); report in <output_dir>/study_report.md")
    parser.add_argument("--study_high_resolution", type=_yes_no, default=True, metavar="true|false",
                        help="with --study: the pairs at twice --resolution too (default true)")
    parser.add_argument("--study_generation", type=_yes_no, default=True, metavar="true|false",
                        help="with --study: priors, gFID and bits/code for each family's picks (default true)")
    parser.add_argument("--study_high_generation", action="store_true",
                        help="with --study: priors and gFID at twice --resolution too")
    parser.add_argument("--shard", default="0/1",
                        help="with --study: run share i of n (i/n) of each phase; the shards wait for each other")
    parser.add_argument("--subprocess", action="store_true",
                        help="run each stage as its own process (slower start, isolated memory)")
    return parser


def main(argv=None) -> Path:
    args = build_parser().parse_args(argv)
    started = time.time()
    runner = run_study if args.study else run_sweep if args.sweep else run_ablation
    # One ablation per folder; the shards of a study share theirs, one process per shard.
    lock = f".provq-shard-{'-of-'.join(map(str, parse_shard(args.shard)))}.lock" if args.study else LOCK_NAME
    with output_lock(output_folder(args), name=lock):
        report = runner(args, started)
    print(f"\n[ablation] report: {report} ({(time.time() - started) / 60:.1f} min)", flush=True)
    return report


if __name__ == "__main__":
    run_command("python -m ablation", main,
                resume="rerun the same command: finished stages are skipped, trainings resume from their checkpoints")
