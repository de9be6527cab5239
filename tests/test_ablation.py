"""The ablation's variants, verdicts, stage timings and report (no training: the stages are faked)."""

import argparse
import json

from ablation import __main__ as ablation_main
from ablation.report import strongest, verdict, write_report
from ablation.variants import base_variants, derived_variants


def test_variants_differ_only_in_discretization():
    variants = base_variants()
    names = [v.name for v in variants]
    assert names == ["vq", "vq+kmeans", "step", "step+kmeans", "linear", "linear+kmeans",
                     "cosine", "cosine+kmeans", "vq+l2"]
    assert [v.name for v in variants if v.hard] == ["vq", "vq+kmeans", "vq+l2"]
    assert not any(v.smooth for v in variants if v.schedule in ("none", "step"))
    # every variant sets the same four fields, so nothing else can differ between them
    assert {tuple(v.overrides()[::2]) for v in variants} == {tuple(variants[0].overrides()[::2])}
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


def test_stage_times_survive_a_resume(tmp_path, monkeypatch):
    calls = []

    def fake_run_once(name, step, done, timings=None, capture_to=None, in_process=False):
        if done.exists():
            return False
        calls.append(name)
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text("done")
        timings[name] = 60.0
        return True

    monkeypatch.setattr(ablation_main.pipeline, "run_once", fake_run_once)
    args = argparse.Namespace(output_dir=str(tmp_path), quick=True, subprocess=False)
    first = ablation_main.Ablation(args, ablation_main.SETTINGS["quick"])
    first.run("a", None, tmp_path / "a.done")
    first.run("b", None, tmp_path / "b.done")
    resumed = ablation_main.Ablation(args, ablation_main.SETTINGS["quick"])
    for name in ("a", "b", "c"):
        resumed.run(name, None, tmp_path / f"{name}.done")
    assert calls == ["a", "b", "c"]  # a finished stage is never rerun
    summary = resumed.time_summary(started=0.0)
    assert (summary["stage_minutes"], summary["stages"], summary["untimed_stages"]) == (3.0, 3, 0)
