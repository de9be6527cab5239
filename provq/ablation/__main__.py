"""ProVQ versus hard VQ on one budget, and a scale sweep: python -m provq.ablation [--quick | --sweep] [...].

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
import time
from dataclasses import asdict, replace
from pathlib import Path

from provq.ablation.ledger import trained_on
from provq.ablation.plan import CHECKED
from provq.ablation.report import strongest, write_report, write_sweep_report
from provq.ablation.runner import (
    SWEEP_LARGE,
    SWEEP_POINTS,
    Ablation,
    Setting,
    parse_shard,
    setting_of,
)
from provq.ablation.variants import SWEEP, select
from provq.common.cli import CommandParser, command_name, count, run_command
from provq.common.errors import ConfigError
from provq.common.locks import LOCK_NAME, output_lock


def run_ablation(args, started: float) -> Path:
    setting = setting_of(args)
    out = output_folder(args)
    ablation = Ablation(args, setting, out)
    variants = select(setting.variants)
    if args.recheck:
        return recheck(args, ablation, variants)
    results, generation = ablation.all_runs(variants)
    return write_report(out, variants, results, generation,
                        {"setting": asdict(setting), "dataset": args.dataset, "config": args.config,
                         "gfid_reference": f"{ablation.ref_split} split", **ablation.time_summary(started),
                         "full": args.full})


def recheck(args, ablation: Ablation, variants: list) -> Path:
    """--recheck: the first variant's first seed trained again here, its metrics beside the ledger's."""
    if ablation.ledger is None:
        raise ConfigError("--recheck checks a run of a study's ledger: give --ledger and --plan too")
    original, metrics = ablation.recheck(variants[0], args.first_seed)
    for key in CHECKED:
        print(f"[recheck] {variants[0].name} seed {args.first_seed} {key}: ledger ({trained_on(original)}) "
              f"{original['metrics'].get(key)!r}, here {metrics.get(key)!r}", flush=True)
    return ablation.ledger.path


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
    from provq.ablation.study import Study, StudyPlan, study_families
    from provq.ablation.study_report import write_study_report

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


def _yes_no(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m provq.ablation", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="emoji32", help="a preset name or YAML file (default emoji32)")
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
    parser.add_argument("--steps", type=count, default=None, help="tokenizer steps per run")
    parser.add_argument("--prior_steps", type=count, default=None, help="prior steps per generation run")
    parser.add_argument("--num_samples", type=count, default=None, help="samples per generation run (gFID)")
    parser.add_argument("--seeds", type=count, default=None)
    parser.add_argument("--first_seed", type=int, default=0,
                        help="the seeds are first_seed .. first_seed + seeds - 1 (a study's, apart from its pilot's)")
    parser.add_argument("--codebook_size", type=int, default=None)
    parser.add_argument("--full", action="store_true", help="gFID for every seed, not only seed 0")
    parser.add_argument("--cfg_scale", type=float, default=None,
                        help="the samples' CFG scale (default: generator.sampling.DEFAULT_CFG_SCALE)")
    parser.add_argument("--no_generation", action="store_true", help="no priors and no gFID: tokenizers only")
    parser.add_argument("--no_train_pixels", action="store_true",
                        help="no PSNR/SSIM over the training images (the test split's metrics only)")
    parser.add_argument("--ledger", default=None,
                        help="a study's ledger (docs/results/ledger.jsonl): runs it holds are not run again, "
                             "finished runs are added (provq/ablation/ledger.py)")
    parser.add_argument("--plan", default="exploratory",
                        help="with --ledger: the plan version the runs belong to (docs/results/study_plan.yaml)")
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
                        help="run share i of n (i/n): with --study, of each phase (the shards wait for each other); "
                             "with --ledger, of the tokenizer runs (the others are read from the ledger)")
    parser.add_argument("--recheck", action="store_true",
                        help="with --ledger: train the first variant's first seed again here and add it as a check "
                             "line; the plan's report pools this CPU's runs with the original's when they match")
    parser.add_argument("--compile", action="store_true",
                        help="compile the tokenizers' encoder and decoder and rFID's Inception network (inductor, "
                             "needs g++; cached on disk): faster after a slow first compile "
                             "(bench/results/study_unit.json); a run compiled is another run in a ledger")
    parser.add_argument("--subprocess", action="store_true",
                        help="run each stage as its own process (slower start, isolated memory)")
    return parser


def main(argv=None) -> Path:
    args = build_parser().parse_args(argv)
    started = time.time()
    runner = run_study if args.study else run_sweep if args.sweep else run_ablation
    # One ablation per folder; the shards of a study share theirs, one process per shard.
    sharded = args.study or parse_shard(args.shard)[1] > 1
    lock = f".provq-shard-{'-of-'.join(map(str, parse_shard(args.shard)))}.lock" if sharded else LOCK_NAME
    with output_lock(output_folder(args), name=lock):
        report = runner(args, started)
    print(f"\n[ablation] report: {report} ({(time.time() - started) / 60:.1f} min)", flush=True)
    return report


def entry() -> None:
    """The console command (``provq-...``) and ``python -m``."""
    run_command(command_name("python -m provq.ablation"), main,
                resume="rerun the same command: finished stages are skipped, trainings resume from their checkpoints")


if __name__ == "__main__":
    entry()
