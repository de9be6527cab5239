"""ProVQ versus hard VQ on one budget, and a scale sweep: python -m ablation [--quick | --sweep] [...].

Trains tokenizers that differ only in how discretization arrives (schedule, k-means init, l2
codes, mechanism) over several seeds, evaluates each with hard quantization (rFID, PSNR and SSIM
on every test image, PSNR and SSIM on every training image, usage, perplexity) and, for seed 0
(every seed with --full), a fixed-budget prior (gFID); writes ``<output_dir>/report.md`` with
paired verdicts. ``--sweep`` repeats three variants at several codebook sizes and budgets.
A finished variant x seed is never retrained: rerunning continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ablation.report import strongest, write_report, write_sweep_report
from ablation.variants import DEFAULT, QUICK, SWEEP, Variant, select
from common.cli import run_command
from common.errors import ConfigError
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
        if commands.run_unless_done(name, command, done, self.timings, in_process=not self.args.subprocess):
            self.timings_path.parent.mkdir(parents=True, exist_ok=True)
            self.timings_path.write_text(json.dumps(self.timings, indent=1))

    def time_summary(self, started: float) -> dict:
        timed = [self.timings[name] for name in self.stages if name in self.timings]
        return {"stage_minutes": round(sum(timed) / 60, 1), "stages": len(self.stages),
                "untimed_stages": len(self.stages) - len(timed),
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
                     "--tokenizer.model.quantizer.codebook_size", str(s.codebook_size),
                     "--seed", str(seed), "--max_steps", str(s.tokenizer_steps),
                     "--tokenizer.train.eval_every", str(s.eval_every),
                     "--tokenizer.train.image_every", str(s.tokenizer_steps),
                     "--tokenizer.train.save_every", str(max(s.eval_every, s.tokenizer_steps // 4)),
                     *variant.overrides())
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
        self.run(f"{name}: gFID", commands.evaluate(
            "gfid", "--samples", str(run / "samples" / "samples.npz"), "--ref", str(self.ref),
            "--out", str(run / "gfid.json")), run / "gfid.json")
        return json.loads((run / "gfid.json").read_text())["metrics"]

    def all_runs(self, variants: list[Variant]) -> tuple[dict, dict]:
        s = self.setting
        if s.generation:
            self.reference()
        results = {v.name: [self.tokenizer(v, seed) for seed in range(s.seeds)] for v in variants}
        gen_seeds = range(s.seeds) if self.args.full else range(1)
        generation = {v.name: [self.generation(v, seed) for seed in gen_seeds] for v in variants} \
            if s.generation else {}
        return results, generation


def last_geometry(run: Path) -> dict:
    """The effective dimension of z_e and of the used codes at the run's last evaluation."""
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "eval/dim_latents" in r]
    return {"dim_latents": rows[-1]["eval/dim_latents"], "dim_codes": rows[-1]["eval/dim_codes"]} if rows else {}


def setting_of(args) -> Setting:
    """The named setting with the command line's overrides."""
    setting = SETTINGS["quick" if args.quick else "default"]
    changes = {k: v for k, v in (("seeds", args.seeds), ("tokenizer_steps", args.steps),
                                 ("codebook_size", args.codebook_size)) if v is not None}
    if args.variants:
        changes["variants"] = tuple(v.name for v in select(args.variants))
    if changes.get("seeds", 1) < 1 or changes.get("tokenizer_steps", 1) < 1:
        raise ConfigError("--seeds and --steps must be >= 1")
    return replace(setting, **changes)


def run_ablation(args, started: float) -> Path:
    setting = setting_of(args)
    out = Path(args.output_dir or ("runs/ablation_quick" if args.quick else "runs/ablation"))
    ablation = Ablation(args, setting, out)
    variants = select(setting.variants)
    results, generation = ablation.all_runs(variants)
    return write_report(out, variants, results, generation,
                        {"setting": asdict(setting), "dataset": args.dataset, "config": args.config,
                         "gfid_reference": f"{ablation.ref_split} split", **ablation.time_summary(started),
                         "full": args.full})


def run_sweep(args, started: float) -> Path:
    """SWEEP's variants at each (codebook size, steps), 3 seeds, no gFID; one report with the paired
    difference best ProVQ minus best hard VQ against size and budget."""
    out = Path(args.output_dir or "runs/ablation_sweep")
    base = setting_of(args)
    variants = select(args.variants or SWEEP)
    points, summary = [], {}
    for codebook, steps in (*SWEEP_POINTS, *((SWEEP_LARGE,) if args.sweep_large else ())):
        # Traded for time (90 minutes on 2 cores): no gFID, no training-split metrics, 8 eval points.
        setting = replace(base, codebook_size=codebook, tokenizer_steps=steps, generation=False,
                          train_pixels=False, eval_every=max(50, steps // 8),
                          variants=tuple(v.name for v in variants))
        ablation = Ablation(args, setting, out / f"k{codebook}_s{steps}")
        results, _ = ablation.all_runs(variants)
        points.append({"codebook_size": codebook, "steps": steps, "label": f"{codebook} codes, {steps} steps",
                       "results": results, "provq": strongest(variants, results, lambda v: v.smooth).name,
                       "hard": strongest(variants, results, lambda v: v.hard).name})
        for key, value in ablation.time_summary(started).items():
            summary[key] = summary.get(key, 0) + value if key != "minutes" else value
    return write_sweep_report(out, points, summary)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m ablation", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/emoji32.yaml")
    parser.add_argument("--dataset", default="emoji", help="emoji, a hub dataset name or a folder")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--output_dir", default=None,
                        help="default: runs/ablation (runs/ablation_quick, runs/ablation_sweep)")
    parser.add_argument("--quick", action="store_true", help="1 seed, tiny budgets: a smoke check")
    parser.add_argument("--sweep", action="store_true",
                        help=f"{', '.join(SWEEP)} x 3 seeds at (codes, steps) {SWEEP_POINTS}")
    parser.add_argument("--sweep_large", action="store_true", help=f"with --sweep: also {SWEEP_LARGE}")
    parser.add_argument("--variants", default=None, help="comma-separated variant names (see ablation/variants.py)")
    parser.add_argument("--steps", type=int, default=None, help="tokenizer steps per run")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--codebook_size", type=int, default=None)
    parser.add_argument("--full", action="store_true", help="gFID for every seed, not only seed 0")
    parser.add_argument("--cfg_scale", type=float, default=2.0)
    parser.add_argument("--subprocess", action="store_true",
                        help="run each stage as its own process (slower start, isolated memory)")
    args = parser.parse_args(argv)
    started = time.time()
    report = run_sweep(args, started) if args.sweep else run_ablation(args, started)
    print(f"\n[ablation] report: {report} ({(time.time() - started) / 60:.1f} min)", flush=True)
    return report


if __name__ == "__main__":
    run_command("python -m ablation", main)
