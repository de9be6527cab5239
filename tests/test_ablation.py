"""The ablation's variants, paired statistics, verdicts, report, CLI, and its stages' skip-if-done."""

import argparse
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from scipy import stats
from training_helpers import REPO

from provq.ablation import __main__ as ablation_main
from provq.ablation import runner
from provq.ablation.report import (
    curve_panels,
    strongest,
    sweep_panels,
    write_report,
    write_sweep_report,
)
from provq.ablation.statistics import paired_difference, verdict_line
from provq.ablation.variants import DEFAULT, READINGS, REMEDIES, SWEEP, VARIANTS, Q, select
from provq.commands import train_tokenizer
from provq.common.cli import make_parser, parse_config
from provq.common.errors import ConfigError
from provq.common.typed_config import config_to_dict
from provq.pipeline import commands


def test_variants_differ_only_in_discretization():
    variants = list(VARIANTS.values())
    assert set(DEFAULT) | set(SWEEP) <= set(VARIANTS)
    assert {"vq+kmeans+l2", "step+kmeans+l2", "cosine+l2", "cosine+kmeans+l2+long"} <= set(VARIANTS)
    assert [v.name for v in select(DEFAULT) if v.hard] == ["vq", "vq+l2", "vq+kmeans+l2"]
    assert not any(v.smooth for v in variants if v.schedule in ("none", "step"))
    # Each variant's command line builds a valid config; configs differ only in the quantizer
    # fields that decide how discretization arrives, and no two variants are alike.
    rest, decided = [], []
    for v in variants:
        argv = ["--config", str(REPO / "configs" / "emoji32.yaml"), "--output_dir", "o", *v.overrides(1024)]
        config = config_to_dict(parse_config(make_parser("t"), train_tokenizer.TrainTokenizerConfig, "tokenizer", argv)[0])
        quantizer = config["tokenizer"]["model"]["quantizer"]
        decided.append((quantizer.pop("schedule"), quantizer.pop("kmeans_init"),
                        quantizer.pop("l2_normalize"), quantizer.pop("mechanism"),
                        # the family and the parameters that give it about 1,024 codes
                        *(quantizer.pop(k) for k in ("kind", "levels", "bits", "codebook_size", "codebook_dim")),
                        # the remedy for codebook collapse that meets discretization, if any
                        *(quantizer.pop(k) for k in ("ema_codebook", "codebook_ema_decay", "dead_code_threshold",
                                                     "rotation_trick", "simvq"))))
        rest.append(config)
    assert [(d[0]["kind"], d[1], d[2], d[3], d[4]) for d in decided] == [
        (v.schedule, v.kmeans, v.l2, v.mechanism, v.family) for v in variants]
    assert [(d[9], d[10], d[11] > 0, d[12], d[13]) for d in decided] == [
        (v.ema, 0.99, v.restart, v.rotation, v.simvq) for v in variants]
    assert {json.dumps(d[4:9]) for d in decided} == {json.dumps(f) for f in (
        ("vq", None, None, 1024, 8), ("fsq", [8, 5, 5, 5], None, 1000, 4), ("lfq", None, 10, 1024, 10))}
    long = next(d[0] for d, v in zip(decided, variants, strict=True) if v.name == "cosine+kmeans+l2+long")
    assert (long["warmup"], long["transition"]) == (0.1, 0.6)
    assert len({json.dumps(d, sort_keys=True) for d in decided}) == len(variants)
    assert all(config == rest[0] for config in rest)
    with pytest.raises(ConfigError, match="unknown variant 'cosin'"):
        select("vq,cosin")


def test_each_remedy_is_one_thing_away_from_its_baseline_and_a_switch_can_sit_anywhere():
    remedies = [v for v in VARIANTS.values() if v.ema or v.restart or v.rotation or v.simvq]
    assert {v.name for v in remedies} == {f"{base}{suffix}" for base in ("vq+kmeans+l2", "cosine+kmeans+l2")
                                          for suffix in ("+ema", "+restart", "+rotation", "+ema+restart")} \
        | {"vq+l2+simvq", "cosine+l2+simvq"}
    fields = ("schedule", "kmeans", "l2", "mechanism", "warmup", "transition", "family",
              "ema", "restart", "rotation", "simvq")
    for v in remedies:  # simvq: k-means cannot set its codes, so its baseline is the one without
        base = VARIANTS[v.name.split("+ema")[0] if v.ema else v.name.rsplit("+", 1)[0]]
        differ = [f for f in fields if getattr(v, f) != getattr(base, f)]
        assert differ == (["ema"] if v.ema and not v.restart else ["ema", "restart"] if v.ema else
                          [next(f for f in ("restart", "rotation", "simvq") if getattr(v, f))]), v.name
    assert VARIANTS["cosine+kmeans+l2+ema+restart"].restart and set(REMEDIES) <= set(VARIANTS)
    late, named = select("step@0.85+kmeans+l2,step@.3+fsq")
    assert late == VARIANTS["step@0.85+kmeans+l2"] and late == replace(VARIANTS["step+kmeans+l2"], name=late.name,
                                                                       warmup=0.85)
    assert (named.name, named.warmup, named.family) == ("step@0.3+fsq", 0.3, "fsq")
    assert f"{Q}schedule.warmup" in named.overrides(1024) and "0.3" in named.overrides(1024)
    for wrong in ("step@1.5+kmeans+l2", "step@0.5+kmeans+l2+ema", "cosine@0.5+kmeans+l2", "step@0"):
        with pytest.raises(ConfigError, match="step@F<suffix>"):
            select(wrong)


def test_the_readings_of_hardness_differ_from_the_ramp_in_the_mechanism_only():
    ramp = VARIANTS["cosine+kmeans+l2"]
    readings = select(READINGS)
    assert {v.mechanism for v in readings if v.smooth} == {"interpolate", "stochastic", "soft", "gumbel"}
    for name in ("cosine+soft+kmeans+l2", "cosine+gumbel+kmeans+l2"):
        variant = VARIANTS[name]
        assert variant.overrides(1024) != ramp.overrides(1024)
        assert replace(variant, name=ramp.name, mechanism=ramp.mechanism) == ramp


def test_paired_difference_is_the_t_interval_of_the_seed_differences():
    a, b = [22.0, 22.3, 21.9], [21.5, 21.9, 21.6]  # differences 0.5, 0.4, 0.3: mean 0.4, sd 0.1
    d = paired_difference(a, b)
    half = 4.302652729911275 * 0.1 / 3**0.5  # t(0.975, 2 dof) * sd / sqrt(n), by hand
    assert stats.t.ppf(0.975, 2) == pytest.approx(4.302652729911275)
    assert (d.mean, d.low, d.high, d.seeds) == (pytest.approx(0.4), pytest.approx(0.4 - half),
                                                 pytest.approx(0.4 + half), 3)
    assert d.excludes_zero and "a is better" in verdict_line("PSNR", ("a", "b"), d, higher=True)
    noisy = paired_difference([20.0, 22.0, 24.0], [21.0, 21.1, 21.2])
    assert not noisy.excludes_zero
    assert "no measurable difference" in verdict_line("PSNR", ("a", "b"), noisy, higher=True)
    lower_wins = paired_difference([10.0, 11.0, 10.5], [20.0, 21.0, 20.4])
    assert "a is better" in verdict_line("rFID", ("a", "b"), lower_wins, higher=False)
    assert paired_difference([1.0], [2.0]).low is None  # one seed: no interval
    assert paired_difference([1.0, None], [2.0, 3.0]).seeds == 1  # a missing seed is left out


def _results(psnr: dict[str, list[float]]) -> dict:
    return {name: [{"psnr": p, "rfid": 100 - p, "ssim": p / 30, "codebook_usage": p / 30,
                    "codebook_perplexity": 10 * p, "train_psnr": p + 1, "train_ssim": p / 29} for p in values]
            for name, values in psnr.items()}


def test_strongest_by_mean_psnr():
    variants = select(DEFAULT)
    results = _results({v.name: [20.0 + i, 20.5 + i] for i, v in enumerate(variants)})
    assert strongest(variants, results, lambda v: v.hard).name == "vq+kmeans+l2"
    assert strongest(variants, results, lambda v: v.smooth).name == "cosine+kmeans"


def test_report_has_table_paired_verdicts_time_and_a_plot(tmp_path):
    variants = select(DEFAULT)
    results = _results({v.name: [20.0 + 0.1 * i, 20.2 + 0.1 * i, 20.1 + 0.1 * i] for i, v in enumerate(variants)})
    generation = {v.name: [{"fid": 150.0 - i}] for i, v in enumerate(variants)}
    for v in variants:  # curves of two seeds each
        for seed in (0, 1):
            log = tmp_path / v.name / f"seed{seed}" / "tok" / "metrics.jsonl"
            log.parent.mkdir(parents=True)
            log.write_text("".join(json.dumps({"step": s, "eval/usage": s / 100 + seed / 10,
                                               "eval/dim_latents": 3.0, "quantizer/ever_used": 0.5}) + "\n"
                                   for s in (10, 20)))
    info = {"setting": {"seeds": 3, "tokenizer_steps": 20, "prior_steps": 5, "num_samples": 10,
                        "codebook_size": 1024},
            "dataset": "emoji", "config": "configs/emoji32.yaml", "gfid_reference": "train split",
            "full": False, "stage_minutes": 12.5, "stages": 40, "untimed_stages": 3, "minutes": 0.1}
    text = write_report(tmp_path, variants, results, generation, info).read_text()
    assert "| cosine+kmeans | 3 |" in text and text.count("\n| ") == len(variants) + 1
    assert "Best ProVQ vs strongest hard VQ (both by mean PSNR): `cosine+kmeans` vs `vq+kmeans+l2`" in text
    assert "`cosine+kmeans+l2` vs `step+kmeans+l2`" in text and "`cosine+l2` vs `vq+l2`" in text
    # every variant is 0.1 dB from the next in every seed: paired, that difference is exact and real
    assert "- PSNR (dB): cosine+kmeans+l2 - step+kmeans+l2 = +0.2, 95% interval [+0.2, +0.2]" in text
    assert "- gFID: cosine+kmeans+l2 - step+kmeans+l2 = -2 (one seed: no interval)." in text
    assert "12.5 min summed over the 40 stages" in text and "3 stages ran without" in text
    assert "![usage, PSNR and the geometry of latents and codes over the steps](curves.png)" in text
    assert (tmp_path / "curves.png").is_file()
    # what the curves show: per variant the mean over its two seeds, step by step; no PSNR was logged
    panels = dict(curve_panels(lambda v: sorted(tmp_path.glob(f"{v.name}/seed*/tok/metrics.jsonl")), variants))
    usage = panels["codebook usage (test batches)"]
    assert set(usage) == {v.name for v in variants}
    assert all(u == ([10, 20], [pytest.approx(0.15), pytest.approx(0.25)]) for u in usage.values())
    assert all(curve == ([], []) for curve in panels["PSNR, test batches (dB)"].values())


def test_sweep_report_plots_the_paired_difference_per_point(tmp_path):
    points = [{"codebook_size": k, "steps": s, "label": f"{k} codes, {s} steps",
               "results": _results({"vq+kmeans+l2": [20.0, 20.1, 20.2], "cosine+kmeans+l2": [20.5, 20.4, 20.9],
                                    "step+kmeans+l2": [20.2, 20.2, 20.2]}),
               "provq": "cosine+kmeans+l2", "hard": "vq+kmeans+l2"} for k, s in ((1024, 400), (16384, 400))]
    info = {"stage_minutes": 80.0, "stages": 54, "untimed_stages": 0, "minutes": 81.0}
    text = write_sweep_report(tmp_path, points, info).read_text()
    assert "| 16384 codes, 400 steps | PSNR (dB) | cosine+kmeans+l2 | vq+kmeans+l2 | +0.5 |" in text
    assert (tmp_path / "sweep.png").is_file()
    # the plotted points: PSNR differences 0.5, 0.3, 0.7 -> mean 0.5, sd 0.2, t(0.975, 2) = 4.303
    labels, means, lows, highs = sweep_panels(points)["PSNR (dB)"]
    half = 4.302652729911275 * 0.2 / 3**0.5
    assert labels == ["1024 codes, 400 steps", "16384 codes, 400 steps"]
    assert means == [pytest.approx(0.5)] * 2 and lows == [pytest.approx(0.5 - half)] * 2
    assert highs == [pytest.approx(0.5 + half)] * 2


def test_the_command_line_chooses_variants_budget_and_sweep(tmp_path):
    def args(*argv):
        return ablation_main.build_parser().parse_args(["--output_dir", str(tmp_path / "out"), *argv])

    setting = runner.setting_of(args("--variants", "vq+l2,cosine+l2", "--steps", "120", "--seeds", "2",
                                            "--codebook_size", "256", "--prior_steps", "50"))
    assert (setting.variants, setting.tokenizer_steps, setting.seeds, setting.codebook_size,
            setting.prior_steps, setting.num_samples) == (("vq+l2", "cosine+l2"), 120, 2, 256, 50, 500)
    with pytest.raises(ConfigError, match="unknown variant"):
        runner.setting_of(args("--variants", "nope"))
    with pytest.raises(ConfigError, match="argument --steps: must be >= 1, got 0"):
        args("--steps", "0")
    points = [(s.codebook_size, s.tokenizer_steps, s.generation, s.train_pixels, s.eval_every, s.variants)
              for s in ablation_main.sweep_settings(args("--sweep", "--seeds", "3"))]
    sweep = ("vq+kmeans+l2", "step+kmeans+l2", "cosine+kmeans+l2")
    assert points == [(1024, 400, False, False, 50, sweep), (1024, 2000, False, False, 250, sweep),
                      (16384, 400, False, False, 50, sweep)]
    assert len(ablation_main.sweep_settings(args("--sweep", "--sweep_large"))) == 4


def test_finished_stages_are_skipped_and_their_times_survive_a_resume(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")

    def stats(name):  # a real stage: Inception statistics of the folder, run in this process
        out = tmp_path / f"{name}.npz"
        return commands.evaluate("stats", "--images", str(images), "--batch_size", "4", "--out", str(out)), out

    args = argparse.Namespace(output_dir=str(tmp_path / "ablation"), quick=True, subprocess=False)
    first = runner.Ablation(args, runner.SETTINGS["quick"], tmp_path / "ablation")
    first.run("a", *stats("a"))
    written = (tmp_path / "a.npz").stat().st_mtime_ns
    resumed = runner.Ablation(args, runner.SETTINGS["quick"], tmp_path / "ablation")
    for name in ("a", "b"):
        resumed.run(name, *stats(name))
    assert (tmp_path / "a.npz").stat().st_mtime_ns == written  # a finished stage is never rerun
    assert (tmp_path / "b.npz").is_file()
    assert resumed.timings["a"] == first.timings["a"] > 0  # its time comes from the run that made it
    summary = resumed.time_summary(started=0.0)
    assert (summary["stages"], summary["untimed_stages"]) == (2, 0)
    assert summary["stage_minutes"] == round((first.timings["a"] + resumed.timings["b"]) / 60, 1)
