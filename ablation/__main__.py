"""ProVQ versus hard VQ on one budget: python -m ablation [--quick | --full] [--dataset emoji].

Trains tokenizers that differ only in how discretization arrives (schedule,
k-means init, l2 codes, mechanism) over several seeds, evaluates each with
hard quantization (rFID, PSNR, usage, perplexity) and a fixed-budget prior
(gFID), and writes ``<output_dir>/report.md``. A finished variant x seed is
never retrained: rerunning continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ablation.report import write_report
from ablation.variants import Variant, base_variants, derived_variants
from pipeline import commands


@dataclass(frozen=True)
class Setting:
    seeds: int
    tokenizer_steps: int
    prior_steps: int
    num_samples: int
    eval_every: int
    variants: tuple[str, ...] = ()  # a subset of the base variants; () = all


SETTINGS = {
    # a smoke check of the whole machinery (every stage, both comparisons), not a result
    "quick": Setting(seeds=1, tokenizer_steps=30, prior_steps=30, num_samples=100, eval_every=10,
                     variants=("vq", "vq+kmeans", "step+kmeans", "cosine+kmeans")),
    # what the README quotes: 79.8 minutes measured on 2 CPU cores (bf16, 2 threads)
    "default": Setting(seeds=3, tokenizer_steps=400, prior_steps=400, num_samples=500, eval_every=50),
}


class Ablation:
    def __init__(self, args, setting: Setting):
        self.args, self.setting = args, setting
        self.out = Path(args.output_dir)
        self.test_stats = self.out / "ref" / "test_stats.npz"  # rFID's originals, computed once
        # gFID's reference: the training split; --quick uses the test split's statistics
        # (already needed for rFID) to save ~5 CPU minutes of Inception.
        self.ref_split = "test" if args.quick else "train"
        self.ref = self.test_stats if args.quick else self.out / "ref" / "train_stats.npz"
        # Seconds per stage, recorded by the invocation that ran it: the report's time is
        # then the whole ablation's, however many times it was resumed.
        self.timings_path = self.out / "timings.json"
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

    def reference(self) -> None:
        self.run("reference stats", commands.evaluate(
            "stats", "--dataset", self.args.dataset, "--split", self.ref_split, "--resolution",
            str(self.args.resolution), "--out", str(self.ref)), self.ref)

    def tokenizer(self, variant: Variant, seed: int) -> dict:
        run = self.folder(variant, seed)
        s = self.setting
        overrides = (
            "--data.dataset", self.args.dataset, "--data.resolution", str(self.args.resolution),
            "--tokenizer.model.resolution", str(self.args.resolution),
            "--seed", str(seed), "--max_steps", str(s.tokenizer_steps),
            "--tokenizer.train.eval_every", str(s.eval_every),
            "--tokenizer.train.image_every", str(s.tokenizer_steps),
            "--tokenizer.train.save_every", str(max(s.eval_every, s.tokenizer_steps // 4)),
            *variant.overrides(),
        )
        tok = run / "tok" / "tokenizer"
        self.run(f"{variant.name} seed {seed}: tokenizer",
                 commands.train_tokenizer(self.args.config, run / "tok", *overrides),
                 tok / "model.safetensors")
        self.run(f"{variant.name} seed {seed}: rFID", commands.evaluate(
            "rfid", "--tokenizer", str(tok), "--dataset", self.args.dataset, "--split", "test",
            "--lpips_net", "none", "--ref_stats", str(self.test_stats),
            "--out", str(run / "rfid.json")), run / "rfid.json")
        return json.loads((run / "rfid.json").read_text())

    def generation(self, variant: Variant, seed: int) -> dict:
        run, s, cfg = self.folder(variant, seed), self.setting, self.args.config
        tok = run / "tok" / "tokenizer"
        data = ("--data.dataset", self.args.dataset, "--data.resolution", str(self.args.resolution))
        self.run(f"{variant.name} seed {seed}: codes",
                 commands.extract_codes(tok, cfg, run / "codes", "--flip_copies", *data), run / "codes" / "tokenizer.json")
        self.run(f"{variant.name} seed {seed}: prior", commands.train_prior(
            cfg, run / "codes", run / "prior", "--seed", str(seed), "--max_steps", str(s.prior_steps),
            "--prior.train.image_every", str(s.prior_steps), "--prior.train.save_every",
            str(s.prior_steps)), run / "prior" / "prior" / "model.safetensors")
        self.run(f"{variant.name} seed {seed}: samples", commands.sample(
            tok, run / "prior" / "prior", cfg, run / "samples", s.num_samples,
            "--cfg_scale", str(self.args.cfg_scale), "--seed", str(seed)), run / "samples" / "samples.npz")
        self.run(f"{variant.name} seed {seed}: gFID", commands.evaluate(
            "gfid", "--samples", str(run / "samples" / "samples.npz"), "--ref", str(self.ref),
            "--out", str(run / "gfid.json")), run / "gfid.json")
        return json.loads((run / "gfid.json").read_text())


def best_smooth(results: dict[str, list[dict]], variants: list[Variant]) -> Variant:
    """The smooth-schedule variant with the highest mean PSNR (the least noisy metric here)."""
    def mean_psnr(v):
        values = [r["metrics"]["psnr"] for r in results[v.name]]
        return sum(values) / len(values)

    return max((v for v in variants if v.smooth), key=mean_psnr)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/emoji32.yaml")
    parser.add_argument("--dataset", default="emoji", help="emoji, a hub dataset name or a folder")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--output_dir", default=None, help="default: runs/ablation (runs/ablation_quick)")
    parser.add_argument("--quick", action="store_true", help="1 seed, tiny budgets: a smoke check")
    parser.add_argument("--full", action="store_true", help="gFID for every seed, not only seed 0")
    parser.add_argument("--cfg_scale", type=float, default=2.0)
    parser.add_argument("--subprocess", action="store_true",
                        help="run each stage as its own process (slower start, isolated memory)")
    args = parser.parse_args(argv)
    setting = SETTINGS["quick" if args.quick else "default"]
    args.output_dir = args.output_dir or ("runs/ablation_quick" if args.quick else "runs/ablation")
    ablation = Ablation(args, setting)
    start = time.time()
    ablation.reference()
    variants = [v for v in base_variants() if not setting.variants or v.name in setting.variants]
    results: dict[str, list[dict]] = {}
    for variant in variants:
        results[variant.name] = [ablation.tokenizer(variant, seed) for seed in range(setting.seeds)]
    derived = derived_variants(best_smooth(results, variants))
    for variant in derived:
        results[variant.name] = [ablation.tokenizer(variant, seed) for seed in range(setting.seeds)]
    variants += derived
    gen_seeds = range(setting.seeds) if args.full else range(1)
    generation = {v.name: [ablation.generation(v, seed) for seed in gen_seeds] for v in variants}
    report = write_report(ablation.out, variants, results, generation,
                          {"setting": asdict(setting), "dataset": args.dataset, "config": args.config,
                           "gfid_reference": f"{ablation.ref_split} split",
                           **ablation.time_summary(start), "full": args.full})
    print(f"\n[ablation] report: {report}", flush=True)


if __name__ == "__main__":
    main()
