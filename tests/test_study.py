"""The study (python -m provq.ablation --study): its variants, how it picks, how its shards share work, and
one family's whole study on tiny data."""

from __future__ import annotations

import threading

import pytest
from training_helpers import REPO

from provq.ablation import __main__ as ablation_main
from provq.ablation import runner
from provq.ablation import study as study_module
from provq.ablation.study import (
    Study,
    StudyPlan,
    generation_picks,
    high_resolution_pairs,
    study_families,
)
from provq.ablation.variants import STUDY, VARIANTS, preset_ramp
from provq.commands import train_tokenizer
from provq.common.cli import make_parser, parse_config
from provq.common.typed_config import config_to_dict
from tokenizer.schedule import hardness


def quantizer_of(name: str, codebook_size: int = 1024, preset: str = "emoji32") -> dict:
    argv = ["--config", str(REPO / "configs" / f"{preset}.yaml"), "--output_dir", "o",
            *VARIANTS[name].overrides(codebook_size, preset_ramp(preset))]
    config = parse_config(make_parser("t"), train_tokenizer.TrainTokenizerConfig, "tokenizer", argv)[0]
    return config_to_dict(config)["tokenizer"]["model"]["quantizer"]


@pytest.mark.parametrize("preset", ["emoji32", "imagenet256"])
def test_switches_equalize_the_ramps_mean_hardness_and_its_time_on_hard_codes(preset):
    """On every preset's own ramp (imagenet256's differs from emoji32's): the switch points are derived."""
    steps = 1000
    warmup, transition = preset_ramp(preset)
    for family, (hard, start, mid, end, ramp) in STUDY.items():
        curves = {}
        for name in (hard, start, mid, end, ramp):
            q = quantizer_of(name, preset=preset)
            assert q["kind"] == family
            curves[name] = [hardness(s, _schedule(q), steps) for s in range(steps)]
        assert sum(curves[hard]) == steps
        assert curves[start].index(1.0) == round(warmup * steps)  # the earlier studies' switch
        assert sum(curves[mid]) == pytest.approx(sum(curves[ramp]), abs=1)  # the same mean hardness
        assert curves[end].count(1.0) == curves[ramp].count(1.0)  # the same time on hard codes
        assert curves[ramp].count(1.0) == round((1 - warmup - transition) * steps)


def _schedule(quantizer: dict):
    from tokenizer.schedule import ScheduleConfig

    return ScheduleConfig(**quantizer["schedule"])


def test_family_variants_have_about_a_thousand_codes():
    sizes = {family: quantizer_of(names[0])["codebook_size"] for family, names in STUDY.items()}
    assert sizes == {"vq": 1024, "fsq": 1000, "lfq": 1024}
    assert quantizer_of("cosine+fsq", 16384)["levels"] == [8, 8, 8, 6, 5]
    assert quantizer_of("lfq", 16384)["bits"] == 14
    assert not quantizer_of("cosine+lfq")["kmeans_init"] and quantizer_of("cosine+kmeans+l2")["kmeans_init"]


def test_picks_are_the_best_mean_psnr():
    names = STUDY["fsq"]
    psnr = dict(zip(names, ([20.0, 20.2], [21.0, 21.0], [21.5, 20.0], [22.0, 20.4], [20.5, 20.6]), strict=True))
    results = {name: [{"psnr": p} for p in values] for name, values in psnr.items()}
    families = {"fsq": names}
    # switches: step 21.0, step@mid 20.75, step@end 21.2 -> step@end; progressive best adds the ramp (20.55)
    assert generation_picks(families, results) == {"fsq": ["fsq", "step@end+fsq", "cosine+fsq"]}
    assert high_resolution_pairs(families, results) == {"fsq": ["fsq", "step@end+fsq"]}


def test_a_cut_study_runs_and_reports_only_the_variants_named(tmp_path):
    from provq.ablation.study_report import questions, write_study_report
    from provq.common.errors import ConfigError

    families = study_families("fsq,step@end+fsq,cosine+fsq")
    assert families == {"fsq": ("fsq", None, None, "step@end+fsq", "cosine+fsq")}
    with pytest.raises(ConfigError, match="needs its hard codes"):
        study_families("cosine+fsq")
    with pytest.raises(ConfigError, match="not in the study"):
        study_families("fsq,cosine")
    psnr = {"fsq": [20.0, 20.2], "step@end+fsq": [21.0, 21.4], "cosine+fsq": [20.5, 20.7]}
    results = {name: [{"psnr": p, "seed": s} for s, p in enumerate(values)] for name, values in psnr.items()}
    picks = generation_picks(families, results)
    assert picks == {"fsq": ["fsq", "step@end+fsq", "cosine+fsq"]}
    assert high_resolution_pairs(families, results) == {"fsq": ["fsq", "step@end+fsq"]}
    found = {32: {"results": results, "picks": picks, "generation": {}}}
    asked = [(a, b) for _, a, b in questions("fsq", families["fsq"], found[32])]
    assert asked[:2] == [("step@end+fsq", "fsq"), ("cosine+fsq", "step@end+fsq")]
    assert all(None not in pair and "step+fsq" not in pair for pair in asked)
    text = write_study_report(tmp_path, families, found, {
        "description": "cut", "seeds": 2, "stage_minutes": 0, "stages": 0, "untimed_stages": 0,
        "minutes": 0}).read_text()
    assert "`cosine+fsq` vs `step@end+fsq`" in text and "step@mid" not in text and "Generation" not in text
    assert "side by side" not in text  # one family: nothing to compare it with

    both = study_families("vq+kmeans+l2,cosine+kmeans+l2,fsq,step@end+fsq,cosine+fsq")
    results["vq+kmeans+l2"] = [{"psnr": 19.0, "seed": 0}, {"psnr": 19.4, "seed": 1}]
    results["cosine+kmeans+l2"] = [{"psnr": 20.0, "seed": 0}, {"psnr": 20.1, "seed": 1}]
    found = {32: {"results": results, "picks": generation_picks(both, results), "generation": {}}}
    text = write_study_report(tmp_path, both, found, {
        "description": "two", "seeds": 2, "stage_minutes": 0, "stages": 0, "untimed_stages": 0,
        "minutes": 0}).read_text()
    side = text[text.index("## The families side by side at 32 px"):]
    assert "### FSQ vs VQ, both hard: `fsq` vs `vq+kmeans+l2`" in side
    assert "+0.9" in side.split("### FSQ vs VQ, both with the ramp")[0]  # fsq - vq by seed: +1.0, +0.8
    assert "LFQ" not in side


def test_shards_run_each_job_once_and_wait_for_each_other(tmp_path, monkeypatch):
    monkeypatch.setattr(study_module, "WAIT_SECONDS", 0.01)
    args = ablation_main.build_parser().parse_args(["--study", "--output_dir", str(tmp_path)])
    setting = runner.setting_of(args)
    ran, lock = [], threading.Lock()

    def run(ablation, variant, seed):
        done = ablation.folder(variant, seed) / "rfid.json"
        if not done.exists():
            with lock:
                ran.append((variant.name, seed))
            done.parent.mkdir(parents=True, exist_ok=True)
            done.write_text("{}")
        return {"seed": seed}

    names = list(STUDY["lfq"])
    found = {}

    def shard(i):
        study = Study(args, setting, StudyPlan(seeds=3, resolutions=(32,), shard=i, shards=2), tmp_path)
        found[i] = study._phase("test", 32, names, lambda r: (r / "rfid.json").exists(), run)

    threads = [threading.Thread(target=shard, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(ran) == sorted((n, s) for n in names for s in range(3))  # every job exactly once
    expected = {n: [{"seed": s} for s in range(3)] for n in names}
    assert found[0] == found[1] == expected


@pytest.mark.slow
def test_one_family_study_on_tiny_images(tmp_path, image_folder):
    """FSQ's five variants x 2 seeds at 16 px: tokenizers, rFID, priors, samples, gFID, report."""
    from provq.ablation.study_report import difference_panels, write_study_report

    preset = tmp_path / "tiny.yaml"
    preset.write_text(TINY_PRESET.format(base=REPO / "configs" / "emoji32.yaml"))
    args = ablation_main.build_parser().parse_args([
        "--study", "--config", str(preset), "--dataset", str(image_folder), "--resolution", "16",
        "--steps", "3", "--prior_steps", "2", "--num_samples", "8", "--seeds", "2",
        "--output_dir", str(tmp_path / "study")])
    families = {"fsq": STUDY["fsq"]}
    plan = StudyPlan(seeds=2, resolutions=(16,), families=families)
    setting = runner.setting_of(args)
    found = Study(args, setting, plan, tmp_path / "study").run()
    at = found[16]
    assert set(at["results"]) == set(STUDY["fsq"]) and all(len(r) == 2 for r in at["results"].values())
    assert set(at["generation"]) == set(at["picks"]["fsq"])
    gen = at["generation"]["cosine+fsq"][0]
    assert {"fid", "bits_per_code", "bits_per_image", "distinct_grids", "copied_grids"} <= set(gen)
    assert gen["bits_per_image"] == pytest.approx(gen["bits_per_code"] * 16)  # 4x4 codes at 16 px
    assert 0 < gen["distinct_grids"] <= 1
    report = write_study_report(tmp_path / "study", families, found,
                                {"description": "tiny", "seeds": 2, "stage_minutes": 0, "stages": 0,
                                 "untimed_stages": 0, "minutes": 0})
    text = report.read_text()
    assert "the same time on hard codes" in text and "`cosine+fsq` vs `step@end+fsq`" in text
    assert (tmp_path / "study" / "study_differences.png").is_file()
    labels, means, _, _ = difference_panels(families, found)["PSNR (dB)"]
    assert labels[1] == "fsq: cosine-step@end"  # the ramp against the switch at its end, paired by seed
    results = at["results"]
    expected = sum(a["psnr"] - b["psnr"] for a, b in zip(results["cosine+fsq"], results["step@end+fsq"],
                                                           strict=True)) / 2
    assert means[1] == pytest.approx(expected)


TINY_PRESET = """base: {base}
tokenizer:
  model: {{base_channels: 8, channel_multipliers: [1, 2, 4], latent_channels: 8, norm_num_groups: 4}}
  train: {{batch_size: 8, mixed_precision: "no", eval_batches: 1}}
prior:
  model: {{hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64}}
  train: {{batch_size: 8, mixed_precision: "no", compile: false}}
"""
