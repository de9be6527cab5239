"""The ablation's runner: one setting's runs (variant x seed) under a folder, each stage run unless its
output exists, and the measures read back from the runs (used by python -m provq.ablation and the study)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from provq.ablation.ledger import Ledger, recipe, this_machine
from provq.ablation.variants import DEFAULT, QUICK, Variant, preset_ramp, select
from provq.common.errors import ConfigError
from provq.common.files import write_json_atomic
from provq.common.signals import pause
from provq.pipeline import commands
from provq.pipeline.report import read_jsonl

# The stages whose seconds make a ledger line's wall time: a tokenizer run's, a generation run's.
TOKENIZER_STAGES = ("tokenizer", "rFID", "train pixels")
GENERATION_STAGES = ("codes", "prior", "samples", "gFID")


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
        # The study's ledger (--ledger): a run already there is not run again; a finished one is added.
        self.ledger = Ledger(args.ledger, args.plan) if getattr(args, "ledger", None) else None
        self.rechecking = False  # --recheck: a ledger run trained again under <out>/recheck

    @property
    def compiled(self) -> bool:
        """--compile: the tokenizer's encoder and decoder and the Inception network compiled (inductor)."""
        return bool(getattr(self.args, "compile", False))

    @cached_property
    def ramp(self) -> tuple[float, float]:
        """The preset's ramp, on which the variants place their switches (read once)."""
        return preset_ramp(self.args.config)

    def folder(self, variant: Variant, seed: int) -> Path:
        return self.out / ("recheck" if self.rechecking else "") / variant.name / f"seed{seed}"

    def recheck(self, variant: Variant, seed: int) -> tuple[dict, dict]:
        """--recheck: train and evaluate again, here, a run the ledger holds (from this or another CPU), in
        a folder of its own (<out>/recheck), and add it as a check line (its key and ``recheck``: this
        CPU's model). The plan's report pools two CPUs' runs when a check matches (plan.pooled_groups).
        Returns the ledger's line and the check's metrics."""
        original = self.ledger.find(self.ledger_key(variant, seed))
        if original is None:
            raise ConfigError(f"--recheck: the ledger {self.ledger.path} has no {variant.name} seed {seed} of plan "
                              f"{self.ledger.plan!r} to check; run the study's command first")
        key = {**self.ledger_key(variant, seed), "recheck": this_machine()}
        found = self.ledger.find(key)
        if found is not None:
            return original, found["metrics"]
        self.rechecking = True
        try:
            found_recipe = self.recipe(seed)
            self.ledger.check_recipe(found_recipe)
            metrics, run = self.train_and_evaluate(variant, seed), self.folder(variant, seed)
        finally:
            self.rechecking = False
        self.ledger.append(key, metrics, self.seconds(run, TOKENIZER_STAGES), found_recipe)
        return original, metrics

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

    def seconds(self, run: Path, stages: tuple[str, ...]) -> float:
        """The recorded seconds of a run folder's stages (a ledger line's wall time)."""
        name = str(run.relative_to(self.out))
        return sum(self.timings.get(f"{name}: {stage}", 0.0) for stage in stages)

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

    def ledger_key(self, variant: Variant, seed: int) -> dict:
        s = self.setting
        return {"variant": variant.name, "seed": seed, "steps": s.tokenizer_steps, "codebook_size": s.codebook_size,
                "resolution": self.args.resolution, "dataset": self.args.dataset,
                "config": Path(self.args.config).stem, **({"compile": True} if self.compiled else {})}

    def mine(self, job: int) -> bool:
        """Whether this process runs tokenizer job ``job`` (--shard i/n with --ledger: every n-th)."""
        if self.ledger is None or getattr(self.args, "study", False):
            return True
        shard, shards = parse_shard(self.args.shard)
        return job % shards == shard

    def generation_key(self, variant: Variant, seed: int) -> dict:
        """A generation run's key: its tokenizer's, and the prior's steps and the samples' count."""
        return {**self.ledger_key(variant, seed), "prior_steps": self.setting.prior_steps,
                "num_samples": self.setting.num_samples}

    def from_ledger(self, variant: Variant, seed: int, generation: bool = False) -> dict | None:
        """Another shard's run: its metrics when the ledger holds it already, else None (not reported)."""
        found = self.ledger.find((self.generation_key if generation else self.ledger_key)(variant, seed))
        return None if found is None else found["metrics"]

    def generated(self, variant: Variant, seed: int) -> dict:
        """One variant x seed's prior and samples (gFID, bits per code): from the ledger when it holds
        them, else made and added to it (the tokenizer trained first where this folder lacks it: its
        ledger line may come from another machine)."""
        if self.ledger is None:
            return self.generation(variant, seed)
        found = self.from_ledger(variant, seed, generation=True)
        if found is not None:
            print(f"[ablation] {variant.name} seed {seed}: generation in the ledger {self.ledger.path}", flush=True)
            return found
        self.train_and_evaluate(variant, seed)  # its finished stages are skipped
        metrics = self.generation(variant, seed)
        self.ledger.append(self.generation_key(variant, seed), metrics,
                           self.seconds(self.folder(variant, seed), GENERATION_STAGES))
        return metrics

    def tokenizer(self, variant: Variant, seed: int) -> dict:
        """One variant x seed's metrics: from the ledger when it holds the run, else trained, evaluated
        and added to it."""
        if self.ledger is None:
            return self.train_and_evaluate(variant, seed)
        found = self.from_ledger(variant, seed)
        if found is not None:
            print(f"[ablation] {variant.name} seed {seed}: in the ledger {self.ledger.path}, not run again", flush=True)
            return found
        found_recipe = self.recipe(seed)
        self.ledger.check_recipe(found_recipe)  # before hours of training, not after
        metrics = self.train_and_evaluate(variant, seed)
        self.ledger.append(self.ledger_key(variant, seed), metrics,
                           self.seconds(self.folder(variant, seed), TOKENIZER_STAGES), found_recipe)
        return metrics

    def overrides(self, variant: Variant, seed: int) -> list[str]:
        """The tokenizer run's command-line fields (after --config and --output_dir)."""
        return [*self.common_overrides(seed), *variant.overrides(self.setting.codebook_size, self.ramp),
                *(("--tokenizer.train.compile", "true") if self.compiled else ())]

    def common_overrides(self, seed: int) -> list[str]:
        """What every variant's command line sets: data, seed, steps, cadence."""
        s = self.setting
        return [*self.data(), "--tokenizer.model.resolution", str(self.args.resolution),
                "--seed", str(seed), "--max_steps", str(s.tokenizer_steps),
                "--tokenizer.train.eval_every", str(s.eval_every),
                "--tokenizer.train.image_every", str(s.tokenizer_steps),
                "--tokenizer.train.save_every", str(max(s.eval_every, s.tokenizer_steps // 4))]

    def recipe(self, seed: int) -> str:
        """The runs' recipe (ledger.recipe): the config the training script resolves from the preset
        (with its ramp, from which the variants place their switches) and the code's defaults, without
        the fields every variant's command line sets, nor the variant's own. The same for every variant
        and seed of a study on one preset."""
        from provq.commands.train_tokenizer import TrainTokenizerConfig, build_parser
        from provq.common.cli import parse_config
        from provq.common.typed_config import config_to_dict

        argv = self.common_overrides(seed)
        config, _ = parse_config(build_parser(), TrainTokenizerConfig, "tokenizer",
                                 ["--config", self.args.config, "--output_dir", str(self.out / "recipe"), *argv])
        return recipe(config_to_dict(config), argv)

    def train_and_evaluate(self, variant: Variant, seed: int) -> dict:
        """Train one variant x seed and evaluate it: test rFID/PSNR/SSIM, train PSNR/SSIM."""
        run = self.folder(variant, seed)
        tok, name = run / "tok" / "tokenizer", str(run.relative_to(self.out))
        self.run(f"{name}: tokenizer", commands.train_tokenizer(self.args.config, run / "tok",
                                                                *self.overrides(variant, seed)),
                 tok / "model.safetensors")
        evaluate = ("--tokenizer", str(tok), "--dataset", self.args.dataset, "--lpips_net", "none")
        self.run(f"{name}: rFID", commands.evaluate("rfid", *evaluate, "--split", "test", "--out",
                                                    str(run / "rfid.json"), *(("--compile",) if self.compiled else ())),
                 run / "rfid.json")
        metrics = {**json.loads((run / "rfid.json").read_text())["metrics"], **last_geometry(run / "tok")}
        if not self.setting.train_pixels:
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
            *commands.cfg_flag(self.args.cfg_scale), "--seed", str(seed)), run / "samples" / "samples.npz")
        wait_for(self.ref, "the reference statistics (another shard computes them)")
        self.run(f"{name}: gFID", commands.evaluate(
            "gfid", "--samples", str(run / "samples" / "samples.npz"), "--ref", str(self.ref),
            "--out", str(run / "gfid.json")), run / "gfid.json")
        return {**json.loads((run / "gfid.json").read_text())["metrics"], **prior_measures(run)}

    def all_runs(self, variants: list[Variant]) -> tuple[dict, dict]:
        s = self.setting
        first = int(getattr(self.args, "first_seed", 0) or 0)  # a study's fresh seeds, apart from its pilot's
        seeds = range(first, first + s.seeds)

        def mine(seed: int, i: int) -> bool:
            # Seed-major: every variant's seed s before any seed s + 1, so that a study stopped anywhere
            # holds whole blocks of paired seeds (the shards take every n-th job).
            return self.mine((seed - first) * len(variants) + i)

        if s.generation and self.mine(0):  # the other shards wait for it (generation: wait_for)
            self.reference()
        done = {(seed, i): self.tokenizer(v, seed) for seed in seeds for i, v in enumerate(variants) if mine(seed, i)}
        results = {v.name: [done[seed, i] if mine(seed, i) else self.from_ledger(v, seed) for seed in seeds]
                   for i, v in enumerate(variants)}
        generation = {}
        if s.generation:  # the first seed, or every seed with --full; shared out and kept in the ledger alike
            gen_seeds = seeds if self.args.full else seeds[:1]
            made = {(seed, i): self.generated(v, seed) for seed in gen_seeds for i, v in enumerate(variants)
                    if mine(seed, i)}
            generation = {v.name: [made[seed, i] if mine(seed, i) else self.from_ledger(v, seed, generation=True)
                                   for seed in gen_seeds] for i, v in enumerate(variants)}
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
    if getattr(args, "no_generation", False):
        changes["generation"] = False
    if getattr(args, "no_train_pixels", False):
        changes["train_pixels"] = False
    return replace(setting, **changes)


def parse_shard(text: str) -> tuple[int, int]:
    try:
        shard, shards = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected i/n, e.g. 0/2") from None
    if not 0 <= shard < shards:
        raise ConfigError(f"--shard {text!r}: i must be in [0, n)")
    return shard, shards
