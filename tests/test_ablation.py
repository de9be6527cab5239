"""The ablation's variants, verdicts, report, and its stages' skip-if-done and timings."""

import argparse
import json

import numpy as np
from PIL import Image
from training_helpers import REPO

import train_tokenizer
from ablation import __main__ as ablation_main
from ablation.report import strongest, verdict, write_report
from ablation.variants import base_variants, derived_variants
from common.typed_config import config_to_dict
from pipeline import commands
from training.config import make_parser, parse_config


def test_variants_differ_only_in_discretization():
    variants = base_variants()
    names = [v.name for v in variants]
    assert names == ["vq", "vq+kmeans", "step", "step+kmeans", "linear", "linear+kmeans",
                     "cosine", "cosine+kmeans", "vq+l2"]
    assert [v.name for v in variants if v.hard] == ["vq", "vq+kmeans", "vq+l2"]
    assert not any(v.smooth for v in variants if v.schedule in ("none", "step"))
    # Each variant's command line builds a valid config; configs differ only in the four
    # quantizer fields that decide how discretization arrives, and no two variants are alike.
    rest, decided = [], []
    for v in variants:
        argv = ["--config", str(REPO / "configs" / "emoji32.yaml"), "--output_dir", "o", *v.overrides()]
        config = config_to_dict(parse_config(make_parser("t"), train_tokenizer.TokenizerRun, "tokenizer", argv)[0])
        quantizer = config["tokenizer"]["model"]["quantizer"]
        decided.append((quantizer["schedule"].pop("kind"), quantizer.pop("kmeans_init"),
                        quantizer.pop("l2_normalize"), quantizer.pop("mechanism")))
        rest.append(config)
    assert decided == [(v.schedule, v.kmeans, v.l2, v.mechanism) for v in variants]
    assert len(set(decided)) == len(variants)
    assert all(config == rest[0] for config in rest)
    best = next(v for v in variants if v.name == "linear+kmeans")
    l2, stochastic = derived_variants(best)
    assert (l2.schedule, l2.kmeans, l2.l2, l2.mechanism) == ("linear", True, True, "interpolate")
    assert (stochastic.l2, stochastic.mechanism) == (False, "stochastic")


def test_verdict_compares_the_difference_with_the_seed_spread():
    real = verdict("a", [22.0, 22.1, 22.2], "b", [21.0, 21.1, 21.2], "PSNR", higher=True)
    assert "a is better by 1, larger than the seed spread (0.2)" in real
    noise = verdict("a", [20.0, 22.0, 24.0], "b", [21.0, 21.1, 21.2], "PSNR", higher=True)
    assert "not larger than the seed spread" in noise and "a is better" in noise
    lower_wins = verdict("a", [10.0, 11.0], "b", [20.0, 21.0], "rFID", higher=False)
    assert "a is better by 10" in lower_wins
    assert "no spread" in verdict("a", [1.0], "b", [2.0], "gFID", higher=False)


def _results(psnr: dict[str, list[float]]) -> dict:
    return {name: [{"metrics": {"psnr": p, "rfid": 100 - p, "codebook_usage": p / 30,
                                "codebook_perplexity": 10 * p}} for p in values]
            for name, values in psnr.items()}


def test_strongest_by_mean_psnr():
    variants = base_variants()
    results = _results({v.name: [20.0 + i, 20.5 + i] for i, v in enumerate(variants)})
    assert strongest(variants, results, lambda v: v.hard).name == "vq+l2"
    assert strongest(variants, results, lambda v: v.smooth).name == "cosine+kmeans"


def test_report_has_table_verdicts_time_and_a_plot(tmp_path):
    variants = base_variants()
    results = _results({v.name: [20.0 + 0.1 * i, 20.2 + 0.1 * i] for i, v in enumerate(variants)})
    generation = {v.name: [{"metrics": {"fid": 150.0 - i}}] for i, v in enumerate(variants)}
    for v in variants:  # usage curves of two seeds each
        for seed in (0, 1):
            log = tmp_path / v.name / f"seed{seed}" / "tok" / "metrics.jsonl"
            log.parent.mkdir(parents=True)
            log.write_text("".join(json.dumps({"step": s, "eval/usage": s / 100}) + "\n" for s in (10, 20)))
    info = {"setting": {"seeds": 2, "tokenizer_steps": 20, "prior_steps": 5, "num_samples": 10},
            "dataset": "emoji", "config": "configs/emoji32.yaml", "gfid_reference": "test split",
            "full": False, "stage_minutes": 12.5, "stages": 40, "untimed_stages": 3, "minutes": 0.1}
    text = write_report(tmp_path, variants, results, generation, info).read_text()
    assert "| cosine+kmeans | 2 |" in text and text.count("\n| ") == len(variants) + 1
    assert "Best ProVQ vs strongest hard VQ: `cosine+kmeans` vs `vq+l2`" in text
    assert "`cosine+kmeans` vs `step+kmeans`" in text
    assert "12.5 min summed over the 40 stages" in text and "3 stages ran without" in text
    assert (tmp_path / "usage.png").stat().st_size > 10_000


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
    first = ablation_main.Ablation(args, ablation_main.SETTINGS["quick"])
    first.run("a", *stats("a"))
    written = (tmp_path / "a.npz").stat().st_mtime_ns
    resumed = ablation_main.Ablation(args, ablation_main.SETTINGS["quick"])
    for name in ("a", "b"):
        resumed.run(name, *stats(name))
    assert (tmp_path / "a.npz").stat().st_mtime_ns == written  # a finished stage is never rerun
    assert (tmp_path / "b.npz").is_file()
    assert resumed.timings["a"] == first.timings["a"] > 0  # its time comes from the run that made it
    summary = resumed.time_summary(started=0.0)
    assert (summary["stages"], summary["untimed_stages"]) == (2, 0)
    assert summary["stage_minutes"] == round((first.timings["a"] + resumed.timings["b"]) / 60, 1)
