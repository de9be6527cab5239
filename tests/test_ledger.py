"""The study's ledger, its statistics and its report (issue 30)."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
import torch
from scipy import stats

from provq.ablation import plan as plan_module
from provq.ablation import runner
from provq.ablation.ledger import Ledger, trained_on
from provq.ablation.statistics import holm, pooled_sd, seeds_for_equivalence, tost_p, two_sided_p
from provq.ablation.variants import VARIANTS
from provq.common.errors import ConfigError, FormatError

KEY = {"variant": "vq+kmeans+l2", "seed": 0, "steps": 400, "codebook_size": 1024, "resolution": 32,
       "dataset": "emoji", "config": "emoji32"}


def test_a_run_is_found_by_its_key_and_its_plan(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl", plan="pilot-1")
    assert ledger.find(KEY) is None
    row = ledger.append(KEY, {"psnr": 20.5}, 61.0)
    assert ledger.find(KEY)["metrics"] == {"psnr": 20.5} and row["wall_s"] == 61.0
    assert {"commit", "cpu", "torch", "threads"} <= set(row)
    assert Ledger(ledger.path, plan="study-1").find(KEY) is None  # another version: not the same run
    assert ledger.find({**KEY, "compile": True}) is None  # compiled (--compile): another trajectory, another run
    assert ledger.find({**KEY, "seed": 1}) is None
    ledger.append(KEY, {"psnr": 99.0}, 1.0)  # the same run again (a second writer): not added twice
    assert len(ledger.rows()) == 1


def test_a_commit_is_dirty_for_changed_code_and_not_for_the_studys_own_ledger_and_report(tmp_path):
    from provq.ablation.ledger import commit

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    (tmp_path / "docs" / "results").mkdir(parents=True)
    files = {"code.py": "x = 1\n", "docs/results/ledger.jsonl": "", "docs/results/study_ledger_report.md": "# r\n",
             "docs/results/study_plan.yaml": "versions: {}\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    clean = commit(tmp_path)
    assert clean and "+" not in clean
    (tmp_path / "docs/results/ledger.jsonl").write_text('{"plan": "p"}\n')  # the study appends as it goes
    (tmp_path / "docs/results/study_ledger_report.md").write_text("# r2\n")
    assert commit(tmp_path) == clean
    (tmp_path / "docs/results/study_plan.yaml").write_text("versions: {a: {}}\n")  # not an output: dirty
    assert commit(tmp_path) == clean + "+dirty"
    git("checkout", "docs/results/study_plan.yaml")
    (tmp_path / "code.py").write_text("x = 2\n")
    assert commit(tmp_path) == clean + "+dirty"


def test_a_torn_line_is_named(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text(json.dumps({"plan": "p", **KEY}) + "\n{\"plan\": \"p\", \"vari")
    with pytest.raises(FormatError, match=r"ledger.jsonl:2 is not a JSON line"):
        Ledger(path, "p").rows()


def _append_many(path, start):
    ledger = Ledger(path, plan="p")
    for seed in range(start, start + 20):
        ledger.append({**KEY, "seed": seed}, {"psnr": float(seed)}, 1.0)


def test_two_writers_append_whole_lines(tmp_path):
    path = tmp_path / "ledger.jsonl"
    procs = [multiprocessing.get_context("fork").Process(target=_append_many, args=(path, s)) for s in (0, 10)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    rows = Ledger(path, "p").rows()  # every line parses
    assert sorted(r["seed"] for r in rows) == list(range(30))  # seeds 10-19 written once, by either


def test_runs_in_the_ledger_are_not_run_again_and_shards_split_the_rest(tmp_path, monkeypatch):
    ledger = tmp_path / "ledger.jsonl"
    ran = []

    def fake_run(self, variant, seed):
        ran.append((self.args.shard, variant.name, seed))
        return {"psnr": 20.0 + seed}

    monkeypatch.setattr(runner.Ablation, "train_and_evaluate", fake_run)
    variants = [VARIANTS["vq+kmeans+l2"], VARIANTS["cosine+kmeans+l2"]]
    setting = runner.Setting(seeds=3, tokenizer_steps=400, prior_steps=1, num_samples=1, eval_every=50,
                             variants=tuple(v.name for v in variants), generation=False)

    def args(shard):
        return argparse.Namespace(ledger=str(ledger), plan="pilot-1", shard=shard, dataset="emoji", resolution=32,
                                  config="configs/emoji32.yaml", quick=False, full=False, subprocess=False,
                                  study=False)

    # jobs, seed-major: seed s, variant i -> 2 s + i; shard 0 of 2 takes jobs 0, 2, 4 (vq's seeds 0, 1, 2),
    # and vq's seed 2 is in the ledger
    Ledger(ledger, "pilot-1").append({**KEY, "seed": 2}, {"psnr": 5.0}, 1.0)
    first, _ = runner.Ablation(args("0/2"), setting, tmp_path / "out").all_runs(variants)
    assert [r[1:] for r in ran] == [("vq+kmeans+l2", 0), ("vq+kmeans+l2", 1)]
    assert first["vq+kmeans+l2"] == [{"psnr": 20.0}, {"psnr": 21.0}, {"psnr": 5.0}]
    assert first["cosine+kmeans+l2"] == [None, None, None]  # shard 1's, not done yet
    second, _ = runner.Ablation(args("1/2"), setting, tmp_path / "out").all_runs(variants)
    assert [r[1:] for r in ran[2:]] == [("cosine+kmeans+l2", 0), ("cosine+kmeans+l2", 1), ("cosine+kmeans+l2", 2)]
    assert second["vq+kmeans+l2"] == [{"psnr": 20.0}, {"psnr": 21.0}, {"psnr": 5.0}]
    assert len(ran) == 2 + 3 and len(Ledger(ledger, "pilot-1").rows()) == 6


def _recorded_runs(monkeypatch):
    """Three variants x 2 seeds whose training only records (variant, seed) in ``ran``."""
    ran = []
    monkeypatch.setattr(runner.Ablation, "train_and_evaluate",
                        lambda self, variant, seed: ran.append((variant.name, seed)) or {"psnr": 1.0})
    variants = [VARIANTS["vq+kmeans+l2"], VARIANTS["cosine+kmeans+l2"], VARIANTS["step@mid+kmeans+l2+fit@start"]]
    setting = runner.Setting(seeds=2, tokenizer_steps=400, prior_steps=1, num_samples=1, eval_every=50,
                             variants=tuple(v.name for v in variants), generation=False)
    return ran, variants, setting


def test_runs_go_seed_by_seed_so_a_stopped_study_holds_whole_paired_blocks(tmp_path, monkeypatch):
    ran, variants, setting = _recorded_runs(monkeypatch)
    args = argparse.Namespace(ledger=str(tmp_path / "ledger.jsonl"), plan="p", shard="0/1", dataset="emoji",
                              resolution=32, config="configs/emoji32.yaml", quick=False, full=False,
                              subprocess=False, study=False)
    runner.Ablation(args, setting, tmp_path / "out").all_runs(variants)
    assert ran == [(v.name, 0) for v in variants] + [(v.name, 1) for v in variants]
    ran.clear()
    args.first_seed = 100  # a study's fresh seeds: 100 and 101, in the same order
    results, _ = runner.Ablation(args, setting, tmp_path / "out").all_runs(variants)
    assert ran == [(v.name, 100) for v in variants] + [(v.name, 101) for v in variants]
    assert len(results["vq+kmeans+l2"]) == 2


def test_the_tests_match_scipy_and_holm_matches_a_hand_calculation():
    diffs = [0.12, -0.05, 0.08, 0.02, 0.10]
    assert two_sided_p(diffs) == pytest.approx(stats.ttest_1samp(diffs, 0.0).pvalue)
    margin = 0.2
    lower = stats.ttest_1samp([d + margin for d in diffs], 0.0, alternative="greater").pvalue
    upper = stats.ttest_1samp([d - margin for d in diffs], 0.0, alternative="less").pvalue
    assert tost_p(diffs, margin) == pytest.approx(max(lower, upper))
    assert tost_p(diffs, 0.01) > 0.5  # a margin far inside the spread: not equivalent
    # p = 0.01, 0.04, 0.03 -> sorted 0.01*3 = 0.03, 0.03*2 = 0.06, max(0.04*1, 0.06) = 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_seeds_for_equivalence_is_the_least_n_that_meets_the_bound():
    sd, margin = 0.1, 0.2
    n = seeds_for_equivalence(sd, margin)

    def bound(k):
        return ((stats.t.ppf(0.95, k - 1) + stats.t.ppf(0.9, k - 1)) * sd / margin) ** 2

    assert n >= bound(n) and n - 1 < bound(n - 1)
    assert seeds_for_equivalence(0.25, 0.2) > n and seeds_for_equivalence(10.0, 0.01) is None


def _plan_and_ledger(tmp_path, version: str, seeds: int, primary: str | None = None):
    """A plan of one version comparing variants a and b on PSNR, and its (empty) ledger."""
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"versions:\n  {version}:\n    purpose: a test\n    setting: {{seeds: {seeds}}}\n"
                    "    variants: [a, b]\n" + (f"    primary: {primary}\n" if primary else "")
                    + "    comparisons: [[a, b]]\n    metrics: [psnr]\nmargins: {psnr: 0.2}\n")
    return plan, Ledger(tmp_path / "ledger.jsonl", version)


def test_the_report_is_made_from_the_plan_and_the_ledger(tmp_path):
    plan, ledger = _plan_and_ledger(tmp_path, "v1", seeds=3)
    a, b = [20.0, 21.0, 20.5], [19.9, 20.6, 20.4]
    for seed in range(3):
        ledger.append({**KEY, "variant": "a", "seed": seed}, {"psnr": a[seed]}, 60.0, recipe="0123456789ab")
        ledger.append({**KEY, "variant": "b", "seed": seed}, {"psnr": b[seed]}, 60.0, recipe="0123456789ab")
    text = plan_module.write_plan_report(plan, ledger.path, tmp_path / "report.md").read_text()
    differences = [x - y for x, y in zip(a, b, strict=True)]
    assert "Runs: 6 of 6 planned (0 remaining)" in text and "recipe 0123456789ab (ledger.recipe)" in text
    assert f"{statistics.fmean(differences):+.4g}" in text and f"{statistics.stdev(differences):.3g}" in text
    assert "INTERIM" not in text
    # one comparison: the pooled sd is its own paired sd, and its seed count the per-comparison one
    assert "| PSNR (dB) | 1 | 2 | " + f"{statistics.stdev(differences):.3g}" + " | 0.2 |" in text


def test_primary_verdicts_are_holm_adjusted_and_say_better_equivalent_or_undecided():
    def runs(values):
        return {seed: {"metrics": {"psnr": v}} for seed, v in enumerate(values)}

    table = {"base": runs([20.0, 21.0, 22.0, 20.5, 21.5]),
             "clearly_better": runs([21.0, 22.1, 22.9, 21.6, 22.4]),  # +1 dB, tiny spread
             "same": runs([20.01, 21.0, 21.99, 20.5, 21.51]),  # within 0.01 of the base
             "noisy": runs([21.5, 20.0, 23.0, 19.5, 22.0])}  # a spread far beyond the margin
    primary = [["clearly_better", "base", "psnr"], ["same", "base", "psnr"], ["noisy", "base", "psnr"],
               ["absent", "base", "psnr"]]
    found = plan_module.verdicts(primary, table, {"psnr": 0.2})
    assert [r["verdict"] for r in found] == ["clearly_better better", "equivalent within 0.2", "undecided at n = 5",
                                             "undecided at n = 0"]
    raw = [stats.ttest_1samp([a - b for a, b in zip(
        [table[a][s]["metrics"]["psnr"] for s in range(5)], [table["base"][s]["metrics"]["psnr"] for s in range(5)],
        strict=True)], 0.0).pvalue for a in ("clearly_better", "same", "noisy")] + [1.0]
    assert [r["p_holm"] for r in found] == pytest.approx(holm(raw))


def test_pooled_sd_matches_a_hand_calculation_and_ignores_single_values():
    # variances 1 (1, 2, 3: df 2) and 4.5 (0, 3: df 1): pooled (2 * 1 + 1 * 4.5) / 3 = 13/6
    sd, df = pooled_sd([[1.0, 2.0, 3.0], [0.0, 3.0], [7.0], [None, 5.0]])
    assert df == 3 and sd == pytest.approx((13 / 6) ** 0.5)
    assert pooled_sd([[1.0]]) == (None, 0)


def test_generation_runs_are_ledger_lines_of_their_own_shared_out_like_the_tokenizers(tmp_path, monkeypatch):
    ledger, made, references = tmp_path / "ledger.jsonl", [], []
    monkeypatch.setattr(runner.Ablation, "train_and_evaluate", lambda self, v, seed: {"psnr": 20.0 + seed})
    monkeypatch.setattr(runner.Ablation, "generation",
                        lambda self, v, seed: made.append((self.args.shard, v.name, seed)) or {"fid": 50.0 + seed})
    monkeypatch.setattr(runner.Ablation, "reference", lambda self: references.append(self.args.shard))
    variants = [VARIANTS["vq+kmeans+l2"], VARIANTS["cosine+kmeans+l2"]]
    setting = runner.Setting(seeds=2, tokenizer_steps=400, prior_steps=300, num_samples=100, eval_every=50,
                             variants=tuple(v.name for v in variants), generation=True)

    def run(shard):
        return runner.Ablation(argparse.Namespace(
            ledger=str(ledger), plan="gen", shard=shard, dataset="emoji", resolution=32,
            config="configs/emoji32.yaml", quick=False, full=True, subprocess=False, study=False),
            setting, tmp_path / "out").all_runs(variants)

    run("0/2")
    _, generation = run("1/2")
    assert references == ["0/2"]  # one shard computes gFID's reference statistics, the other waits for them
    assert sorted(m[1:] for m in made) == sorted((v.name, s) for v in variants for s in (0, 1))
    assert generation["cosine+kmeans+l2"] == [{"fid": 50.0}, {"fid": 51.0}]
    rows = Ledger(ledger, "gen").rows()
    gen_rows = [r for r in rows if r.get("prior_steps") == 300 and r.get("num_samples") == 100]
    assert len(rows) == 8 and len(gen_rows) == 4  # 4 tokenizer lines, 4 generation lines
    run("0/1")  # all in the ledger: nothing is made again
    assert len(made) == 4
    runs = plan_module.by_variant(rows)  # the report joins a seed's two lines
    assert runs["vq+kmeans+l2"][1]["metrics"] == {"psnr": 21.0, "fid": 51.0}


def test_a_generation_version_reports_its_tokenizer_lines_before_any_gfid_is_in(tmp_path):
    """study-1-gen's shards train every tokenizer before any prior: the report must read a ledger where
    the seeds have their tokenizer line and no generation line yet (it raised on the missing gFID)."""
    plan = tmp_path / "plan.yaml"
    plan.write_text("versions:\n  gen:\n    runs_per_seed: 2\n    variants: [a, b]\n    setting: {seeds: 2}\n"
                    "    primary: [[a, b, fid], [a, b, bits_per_code]]\n    comparisons: [[a, b]]\n"
                    "    metrics: [fid, bits_per_code, rfid, psnr]\n"
                    "margins: {psnr: 0.2, rfid_relative: 0.05, fid_relative: 0.05, bits_per_code_relative: 0.02}\n")
    rows = [{**r, "plan": "gen"} for r in _rows("AMD EPYC", [0, 1])]
    generation = {**rows[0], "prior_steps": 400, "num_samples": 500, "metrics": {"fid": 90.0, "bits_per_code": 8.0}}
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = plan_module.write_plan_report(plan, ledger, tmp_path / "report.md").read_text()
    assert "Runs: 4 of 8 planned (4 remaining)" in text
    assert text.count("interim (undecided at n = 0)") == 2
    assert "| a - b | rFID | 2 | +0 |" in text and "| a - b | PSNR (dB) | 2 | +1 |" in text  # _rows' metrics
    assert text.count("| a - b | gFID |") == 1  # its verdict row; no pair measured yet: no comparison row
    with open(ledger, "a") as f:
        f.write(json.dumps(generation) + "\n")  # a's seed 0 has its gFID, b's none yet: still no pair
    text = plan_module.write_plan_report(plan, ledger, tmp_path / "report.md").read_text()
    assert "| a | 2 | 90 | 8 | " in text and text.count("interim (undecided at n = 0)") == 2


def test_a_version_short_of_its_planned_runs_labels_its_verdicts_interim(tmp_path):
    plan, ledger = _plan_and_ledger(tmp_path, "s1", seeds=4, primary="[[a, b, psnr]]")
    for seed in range(3):  # 6 of 8 runs
        ledger.append({**KEY, "variant": "a", "seed": seed}, {"psnr": 21.0 + seed}, 60.0)
        ledger.append({**KEY, "variant": "b", "seed": seed}, {"psnr": 20.0 + seed}, 60.0)
    text = plan_module.write_plan_report(plan, ledger.path, tmp_path / "report.md").read_text()
    assert "Runs: 6 of 8 planned (2 remaining)" in text and "INTERIM" in text and "interim (a better)" in text
    ledger.append({**KEY, "variant": "a", "seed": 3}, {"psnr": 24.0}, 60.0)
    ledger.append({**KEY, "variant": "b", "seed": 3}, {"psnr": 23.0}, 60.0)
    text = plan_module.write_plan_report(plan, ledger.path, tmp_path / "report.md").read_text()
    assert "INTERIM" not in text and "| a better |" in text


def _rows(cpu, seeds, a_psnr=21.0):
    base = {"plan": "s1", **KEY, "steps": 1000, "cpu": cpu, "wall_s": 60.0, "threads": 1, "torch": "t",
            "commit": "c"}
    return [{**base, "variant": v, "seed": seed, "metrics": {"psnr": (a_psnr if v == "a" else 20.0) + seed,
                                                               "rfid": 80.0 - seed, "codebook_usage": 0.9}}
            for seed in seeds for v in ("a", "b")]


def test_two_cpus_pool_only_when_a_check_run_matches_its_original():
    rows = _rows("AMD EPYC", range(3)) + _rows("Intel Xeon", [3])
    groups, said = plan_module.pooled_groups(rows)
    assert {k: len(v) for k, v in groups.items()} == {"AMD EPYC": 6, "Intel Xeon": 2} and said == []
    matching = {**rows[0], "cpu": "Intel Xeon", "recheck": "Intel Xeon"}  # a seed 0, again on the Xeon
    groups, said = plan_module.pooled_groups(rows + [matching])
    assert {k: len(v) for k, v in groups.items()} == {"AMD EPYC + Intel Xeon": 8}  # the check line is no run
    assert "pooled" in said[0] and "AMD EPYC / Intel Xeon" in said[0]
    off = {**matching, "metrics": {**matching["metrics"], "rfid": 80.01}}  # 1.25e-4 relative: not the same
    groups, said = plan_module.pooled_groups(rows + [off])
    assert len(groups) == 2 and "kept apart" in said[0]


def test_a_tokenizer_another_version_trained_again_is_compared_with_its_first_line(tmp_path):
    """study-1-gen retrains study-1's tokenizers where their folders are gone: the report says whether
    each retrained line gives its first line's metrics (seed s the same run in another invocation)."""
    first = [{**r, "recipe": "r1", "commit": "old"} for r in _rows("AMD EPYC", [0, 1])]
    again = [{**r, "plan": "gen", "commit": "new"} for r in first]
    again[3]["metrics"] = {**again[3]["metrics"], "rfid": 80.0 - 1 + 0.5}  # b seed 1: another rFID
    generation = {**again[0], "prior_steps": 400, "num_samples": 500, "metrics": {"fid": 90.0}}
    elsewhere = {**first[0], "plan": "gen", "seed": 0, "cpu": "Intel Xeon"}  # another machine: not compared
    rows = first + again + [generation, elsewhere]
    assert plan_module.retrained("s1", rows) == []  # the first lines are no retraining
    said = plan_module.retrained("gen", rows)
    assert said[0].startswith("4 of its tokenizers were trained again as `s1` trained them")
    assert "commits new against old" in said[0]
    assert "1 differ beyond 1e-4 relative: b seed 1 (`s1` rFID 79, here 79.5)" in said[0]
    again[3]["metrics"]["rfid"] = 79.0 + 79.0 * 5e-5  # within 1e-4 relative
    said = plan_module.retrained("gen", first + again)
    assert "all 4 give the same PSNR, rFID and usage within 1e-4 relative (largest relative difference 5e-05)" in (
        said[0])
    plan = tmp_path / "plan.yaml"
    plan.write_text("versions:\n  s1: {variants: [a, b], setting: {seeds: 2}}\n"
                    "  gen: {variants: [a, b], setting: {seeds: 2}}\n")
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text("".join(json.dumps(r) + "\n" for r in first + again))
    text = plan_module.write_plan_report(plan, ledger, tmp_path / "report.md").read_text()
    assert text.count("trained again as `s1`") == 1 and text.index("trained again") > text.index("`gen`")


def test_one_cpu_model_with_and_without_bf16_units_and_a_gpu_are_three_groups():
    rows = _rows("AMD EPYC", range(2))
    wide = [{**r, "cpu_units": "AVX-512 BF16"} for r in rows]
    narrow = [{**r, "cpu_units": "AVX2", "seed": r["seed"] + 2} for r in rows]
    gpu = [{**r, "device": "NVIDIA H200", "seed": r["seed"] + 4} for r in wide]
    groups, said = plan_module.pooled_groups(wide + narrow + gpu)
    assert {k: len(v) for k, v in groups.items()} == {"AMD EPYC (AVX-512 BF16)": 4, "AMD EPYC (AVX2)": 4,
                                                      "NVIDIA H200": 4} and said == []
    check = {**narrow[0], "seed": 0, "recheck": "AMD EPYC (AVX2)"}  # seed 0 again, on the AVX2 machine
    groups, said = plan_module.pooled_groups(wide + narrow + [check])
    assert {k: len(v) for k, v in groups.items()} == {"AMD EPYC (AVX-512 BF16) + AMD EPYC (AVX2)": 8}
    assert "AMD EPYC (AVX-512 BF16) / AMD EPYC (AVX2)" in said[0]


def test_a_new_ledger_line_records_the_cpus_units(tmp_path, monkeypatch):
    from provq.common import machine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(machine, "cpu_description", lambda: {"model": "AMD EPYC", "units": "AVX2"})
    row = Ledger(tmp_path / "l.jsonl", "p").append(KEY, {"psnr": 1.0}, 1.0)
    assert (row["cpu"], row["cpu_units"]) == ("AMD EPYC", "AVX2") and trained_on(row) == "AMD EPYC (AVX2)"
    assert trained_on({"cpu": "AMD EPYC", "device": "cpu"}) == "AMD EPYC"  # a line from before units were kept


def test_recheck_trains_a_ledger_run_again_in_its_own_folder_and_adds_a_check_line(tmp_path, monkeypatch):
    ledger, folders = tmp_path / "ledger.jsonl", []

    def fake_run(self, variant, seed):
        folders.append(self.folder(variant, seed))
        return {"psnr": 21.0, "rfid": 80.0, "codebook_usage": 0.9}

    monkeypatch.setattr(runner.Ablation, "train_and_evaluate", fake_run)
    setting = runner.Setting(seeds=1, tokenizer_steps=400, prior_steps=1, num_samples=1, eval_every=50,
                             variants=("vq+kmeans+l2",), generation=False)
    args = argparse.Namespace(ledger=str(ledger), plan="pilot-1", shard="0/1", dataset="emoji", resolution=32,
                              config="configs/emoji32.yaml", quick=False, full=False, subprocess=False, study=False)
    ablation = runner.Ablation(args, setting, tmp_path / "out")
    with pytest.raises(ConfigError, match="no vq\\+kmeans\\+l2 seed 0"):
        ablation.recheck(VARIANTS["vq+kmeans+l2"], 0)
    Ledger(ledger, "pilot-1").append(KEY, {"psnr": 21.0, "rfid": 80.0, "codebook_usage": 0.9}, 1.0)
    original, metrics = ablation.recheck(VARIANTS["vq+kmeans+l2"], 0)
    assert folders == [tmp_path / "out" / "recheck" / "vq+kmeans+l2" / "seed0"]  # never the study's own folder
    assert ablation.folder(VARIANTS["vq+kmeans+l2"], 0) == tmp_path / "out" / "vq+kmeans+l2" / "seed0"
    rows = Ledger(ledger, "pilot-1").rows()
    assert len(rows) == 2 and rows[1]["recheck"] == trained_on(rows[1]) and original["metrics"] == metrics
    ablation.recheck(VARIANTS["vq+kmeans+l2"], 0)  # checked already on this CPU: not trained again
    assert len(folders) == 1 and len(Ledger(ledger, "pilot-1").rows()) == 2
    groups, said = plan_module.pooled_groups(rows)
    assert len(groups) == 1 and len(next(iter(groups.values()))) == 1 and "the same" in said[0]



def test_the_recheck_command_prints_the_ledgers_metrics_beside_this_machines(tmp_path, monkeypatch, capsys):
    from provq.ablation import __main__ as ablation_main

    monkeypatch.setattr(runner.Ablation, "train_and_evaluate",
                        lambda self, v, seed: {"psnr": 21.5, "rfid": 79.0, "codebook_usage": 0.9})
    ledger = tmp_path / "ledger.jsonl"
    Ledger(ledger, "pilot-1").append({**KEY, "seed": 5}, {"psnr": 21.0, "rfid": 80.0, "codebook_usage": 0.9}, 1.0)
    ablation_main.main(["--ledger", str(ledger), "--plan", "pilot-1", "--recheck", "--no_generation", "--seeds", "1",
                        "--first_seed", "5", "--steps", "400", "--codebook_size", "1024", "--variants", "vq+kmeans+l2",
                        "--output_dir", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "[recheck] vq+kmeans+l2 seed 5 rfid: ledger" in printed and "80.0, here 79.0" in printed
    assert [r.get("recheck") is not None for r in Ledger(ledger, "pilot-1").rows()] == [False, True]



def test_a_changed_preset_is_refused_before_training_and_names_both_recipes(tmp_path, monkeypatch):
    from dataclasses import replace

    from training_helpers import REPO

    from provq.common.errors import UserError

    ran, variants, setting = _recorded_runs(monkeypatch)
    preset = tmp_path / "presets" / "emoji32.yaml"  # the study's preset, by the same name
    preset.parent.mkdir()
    preset.write_text(f"base: {REPO / 'configs' / 'emoji32.yaml'}\n")
    args = argparse.Namespace(ledger=str(tmp_path / "ledger.jsonl"), plan="p", shard="0/1", dataset="emoji",
                              resolution=32, config=str(preset), quick=False, full=False, subprocess=False,
                              study=False)
    runner.Ablation(args, setting, tmp_path / "out").all_runs(variants)
    rows = Ledger(args.ledger, "p").rows()
    assert len(rows) == 6 and len({r["recipe"] for r in rows}) == 1  # every variant and seed: one recipe
    # another cadence of evaluations (set on the command line) is the same experiment: seed 2 runs
    runner.Ablation(args, replace(setting, seeds=3, eval_every=100), tmp_path / "out").all_runs(variants)
    assert len(ran) == 9 and {r["recipe"] for r in Ledger(args.ledger, "p").rows()} == {rows[0]["recipe"]}
    # the preset's learning rate changed: another experiment, refused before its first run trains
    preset.write_text(f"base: {REPO / 'configs' / 'emoji32.yaml'}\ntokenizer:\n  train: {{lr: 1.0e-3}}\n")
    with pytest.raises(UserError, match=f"run with recipe {rows[0]['recipe']} .* give recipe [0-9a-f]{{12}}: the preset"):
        runner.Ablation(args, replace(setting, seeds=4), tmp_path / "out").all_runs(variants)
    assert len(ran) == 9
    # lines written before ledgers carried a recipe do not count
    Ledger(tmp_path / "old.jsonl", "p").append(KEY, {"psnr": 1.0}, 1.0)
    Ledger(tmp_path / "old.jsonl", "p").check_recipe("0123456789ab")


# A stand-in for `python -m provq.ablation`: its share of the variants (variant j goes to shard j % n),
# one ledger line each, and the thread count it was given; with FAKE_STUDY_WAIT it waits for a signal;
# with FAKE_STUDY_CPU (cpu_description's JSON) its lines say it trained on that CPU, not on this one.
FAKE_STUDY = """
import argparse, json, os, signal, sys, time
from pathlib import Path
from provq.ablation.ledger import Ledger, this_machine
from provq.common import machine
if os.environ.get("FAKE_STUDY_CPU"):
    machine.cpu_description = lambda: json.loads(os.environ["FAKE_STUDY_CPU"])
parser = argparse.ArgumentParser()
for name in ("--shard", "--plan", "--ledger", "--variants", "--output_dir"):
    parser.add_argument(name)
parser.add_argument("--recheck", action="store_true")
args = parser.parse_args()
shard, shards = (int(x) for x in args.shard.split("/"))
print("threads", os.environ.get("OMP_NUM_THREADS"), flush=True)
METRICS = {"rfid": 80.0, "codebook_usage": 0.9}
if args.recheck:  # the first variant's seed 0 again: as variant 0's line, or off by 0.5 dB
    psnr = 20.0 + float(os.environ.get("FAKE_STUDY_OFF", "0"))
    key = {"variant": args.variants.split(",")[0], "seed": 0, "recheck": this_machine()}
    Ledger(args.ledger, args.plan).append(key, {"psnr": psnr, **METRICS}, 1.0)
    sys.exit(0)
if os.environ.get("FAKE_STUDY_FAIL") == str(shard):
    print("run 1/2:  50%|#####     | 1/2\\rpython -m provq.ablation: error: shard " + str(shard) + " broke", end="")
    sys.exit(1)
if os.environ.get("FAKE_STUDY_WAIT"):
    signal.signal(signal.SIGTERM, lambda signum, frame: (print("got", signum, flush=True), sys.exit(3)))
    Path(args.output_dir, f"ready{shard}").touch()
    time.sleep(60)
for j, variant in enumerate(args.variants.split(",")):
    if j % shards == shard:
        Ledger(args.ledger, args.plan).append({"variant": variant, "seed": 0}, {"psnr": 20.0 + j, **METRICS}, 1.0)
"""


def _fake_plan(tmp_path, versions: dict, seeds: int = 1, config: str | dict | None = None) -> tuple:
    """A plan of ``versions`` (name: variants) run by FAKE_STUDY; ``config``: every version's preset, or
    a preset per version."""
    script, ledger = tmp_path / "fake_study.py", tmp_path / "ledger.jsonl"
    script.write_text(FAKE_STUDY)
    lines = ["versions:"]
    for name, variants in versions.items():
        preset = config.get(name) if isinstance(config, dict) else config
        setting = f"seeds: {seeds}" + (f", config: {preset}" if preset else "")
        lines += [f"  {name}:", f"    setting: {{{setting}}}", f"    variants: [{', '.join(variants)}]",
                  f"    command: OMP_NUM_THREADS=1 python {script} --plan {name} --ledger {ledger} "
                  f"--output_dir {tmp_path} --shard 0/2 --variants <the variants below>"]
    plan = tmp_path / "plan.yaml"
    plan.write_text("\n".join(lines) + "\n")
    return plan, ledger


def test_continue_runs_each_unfinished_version_in_order_as_one_thread_shards(tmp_path, monkeypatch):
    monkeypatch.delenv("FAKE_STUDY_WAIT", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the shards get one thread each whatever the caller has
    plan, ledger = _fake_plan(tmp_path, {"done": ["a"], "v1": ["a", "b", "c"], "v2": ["d", "e"]})
    Ledger(ledger, "done").append({"variant": "a", "seed": 0}, {"psnr": 1.0}, 1.0)
    assert plan_module.next_version(plan_module.load_yaml(plan), Ledger(ledger, "").rows()) == "v1"
    logs, report = tmp_path / "logs", tmp_path / "report.md"
    assert plan_module.continue_study(plan, ledger, report, 2, logs) == 0
    rows = Ledger(ledger, "").rows()
    assert sorted((r["plan"], r["variant"]) for r in rows) == [
        ("done", "a"), ("v1", "a"), ("v1", "b"), ("v1", "c"), ("v2", "d"), ("v2", "e")]
    assert sorted(p.name for p in logs.iterdir()) == [f"{v}_shard{i}.log" for v in ("v1", "v2") for i in (0, 1)]
    assert all(p.read_text().splitlines()[0] == "threads 1" for p in logs.iterdir())
    assert "Runs: 3 of 3 planned (0 remaining)" in report.read_text()
    assert plan_module.continue_study(plan, ledger, report, 2, logs) == 0  # nothing left: nothing runs
    assert len(Ledger(ledger, "").rows()) == 6


def test_continue_stops_when_a_versions_command_cannot_give_its_planned_runs(tmp_path, capsys):
    plan, ledger = _fake_plan(tmp_path, {"v1": ["a", "b"]}, seeds=2)  # the command runs seed 0 only
    assert plan_module.continue_study(plan, ledger, tmp_path / "report.md", 2, tmp_path / "logs") == 1
    assert len(Ledger(ledger, "").rows()) == 2 and "disagree" in capsys.readouterr().out


def test_a_shard_that_fails_on_its_own_has_its_error_line_printed(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FAKE_STUDY_WAIT", raising=False)
    monkeypatch.setenv("FAKE_STUDY_FAIL", "1")
    plan, ledger = _fake_plan(tmp_path, {"v1": ["a", "b"]})
    assert plan_module.continue_study(plan, ledger, tmp_path / "report.md", 2, tmp_path / "logs") == 1
    out = capsys.readouterr().out
    assert "[plan] v1 shard 1: python -m provq.ablation: error: shard 1 broke" in out and "shard 0:" not in out
    assert [r["variant"] for r in Ledger(ledger, "").rows()] == ["a"]  # shard 0's run stays in the ledger


def test_a_bf16_study_is_not_started_on_a_cpu_that_would_emulate_bf16(tmp_path, monkeypatch, capsys):
    from provq.common import machine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(machine, "cpu_description", lambda: {"model": "AVX2 CPU", "bf16_units": False})
    plan, ledger = _fake_plan(tmp_path, {"v1": ["a", "b"]}, config="emoji32")  # emoji32 trains in bf16
    assert plan_module.continue_study(plan, ledger, tmp_path / "report.md", 2, tmp_path / "logs") == 1
    out = capsys.readouterr().out
    assert "v1: mixed_precision bf16 on a CPU without bf16 units (AVX2 CPU" in out and "recipe is fixed" in out
    assert not ledger.exists() and not (tmp_path / "logs").exists()  # nothing was started
    monkeypatch.setattr(machine, "cpu_description", lambda: {"model": "AMX CPU", "bf16_units": True})
    assert plan_module.continue_study(plan, ledger, tmp_path / "report.md", 2, tmp_path / "logs") == 0


def test_on_a_cpu_without_bf16_units_continue_runs_the_fp32_versions_and_leaves_the_bf16_ones(
        tmp_path, monkeypatch, capsys):
    from provq.common import machine

    monkeypatch.delenv("FAKE_STUDY_WAIT", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    avx2 = {"model": "AMD EPYC", "bf16_units": False, "units": "AVX2"}
    monkeypatch.setattr(machine, "cpu_description", lambda: avx2)
    monkeypatch.setenv("FAKE_STUDY_CPU", json.dumps(avx2))  # the shards too, whatever CPU runs the test
    plan, ledger = _fake_plan(tmp_path, {"bf16": ["a", "b"], "old": ["c"], "fp32": ["d", "e"]},
                              config={"bf16": "emoji32", "old": "configs/emoji32_fp32.yaml",
                                      "fp32": "configs/emoji32_fp32.yaml"})
    plan.write_text(plan.read_text().replace("  old:\n", "  old:\n    superseded_by: fp32\n"))
    report = tmp_path / "report.md"
    assert plan_module.continue_study(plan, ledger, report, 2, tmp_path / "logs") == 1
    out = capsys.readouterr().out
    assert "bf16: mixed_precision bf16 on a CPU without bf16 units" in out and "on to the next version" in out
    assert "left for other machines: bf16 (bf16 recipe: a machine with bf16 units)" in out
    rows = Ledger(ledger, "").rows()
    assert sorted((r["plan"], r["variant"]) for r in rows) == [("fp32", "d"), ("fp32", "e")]  # never the superseded
    assert {trained_on(r) for r in rows} == {"AMD EPYC (AVX2)"}
    assert "Superseded by `fp32`" in report.read_text()
    bf16 = {"model": "AMD EPYC", "bf16_units": True, "units": "AVX-512 BF16"}
    monkeypatch.setattr(machine, "cpu_description", lambda: bf16)
    monkeypatch.setenv("FAKE_STUDY_CPU", json.dumps(bf16))
    assert plan_module.continue_study(plan, ledger, report, 2, tmp_path / "logs") == 0
    rows = Ledger(ledger, "").rows()
    assert sorted((r["plan"], trained_on(r)) for r in rows) == [
        ("bf16", "AMD EPYC (AVX-512 BF16)"), ("bf16", "AMD EPYC (AVX-512 BF16)"),
        ("fp32", "AMD EPYC (AVX2)"), ("fp32", "AMD EPYC (AVX2)")]


def test_on_a_cpu_with_bf16_units_continue_runs_the_bf16_versions_before_the_fp32_ones(tmp_path, monkeypatch):
    """Any machine can add to an fp32 version, only one with bf16 units (or a GPU) to a bf16 one."""
    from provq.common import machine

    monkeypatch.delenv("FAKE_STUDY_WAIT", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    bf16 = {"model": "AMD EPYC", "bf16_units": True, "units": "AVX-512 BF16"}
    monkeypatch.setattr(machine, "cpu_description", lambda: bf16)
    monkeypatch.setenv("FAKE_STUDY_CPU", json.dumps(bf16))
    plan, ledger = _fake_plan(tmp_path, {"fp32": ["d", "e"], "bf16": ["a", "b"]},
                              config={"fp32": "configs/emoji32_fp32.yaml", "bf16": "emoji32"})
    assert plan_module.next_version(plan_module.load_yaml(plan), []) == "bf16"
    assert plan_module.continue_study(plan, ledger, tmp_path / "report.md", 2, tmp_path / "logs") == 0
    assert [r["plan"] for r in Ledger(ledger, "").rows()][:2] == ["bf16", "bf16"]
    assert sorted(r["variant"] for r in Ledger(ledger, "").rows()) == ["a", "b", "d", "e"]
    # the committed plan: its fp32 version (FSQ and LFQ) after every bf16 one, whatever its place in the file
    from training_helpers import REPO

    order = [name for name, _ in plan_module.run_order(plan_module.load_yaml(REPO / "docs/results/study_plan.yaml"))]
    assert order.index("study-1-fsq-lfq-fp32") > max(order.index(n) for n in ("study-1", "study-1-gen", "study-1-64"))
    assert order.index("study-1-gen") > order.index("study-1")  # the plan's order within each group


def _elsewhere(ledger, plan, variant):
    """A line of ``variant`` seed 0 as the fake study writes it, from another machine."""
    row = {"plan": plan, "variant": variant, "seed": 0, "cpu": "Elsewhere CPU", "cpu_units": "AMX", "device": "cpu",
           "torch": "t", "threads": 1, "commit": "c",
           "wall_s": 1.0, "metrics": {"psnr": 20.0, "rfid": 80.0, "codebook_usage": 0.9}}
    with open(ledger, "a") as f:
        f.write(json.dumps(row) + "\n")


def test_a_version_begun_elsewhere_is_checked_here_first_and_continued_when_the_check_matches(tmp_path, monkeypatch,
                                                                                               capsys):
    monkeypatch.delenv("FAKE_STUDY_WAIT", raising=False)
    plan, ledger = _fake_plan(tmp_path, {"v1": ["a", "b"]})
    _elsewhere(ledger, "v1", "a")
    assert plan_module.standing(Ledger(ledger, "").rows(), trained_on({"cpu": "Here", "device": "cpu"})) == "unchecked"
    logs = tmp_path / "logs"
    assert plan_module.continue_study(plan, ledger, tmp_path / "report.md", 2, logs) == 0
    out = capsys.readouterr().out
    assert "v1: its runs so far come from Elsewhere CPU (AMX); first a check on this machine" in out
    rows = Ledger(ledger, "").rows()
    here = plan_module.this_machine()
    assert [(r["variant"], trained_on(r), bool(r.get("recheck"))) for r in rows] == [
        ("a", "Elsewhere CPU (AMX)", False), ("a", here, True), ("b", here, False)]  # a is not run again
    assert plan_module.standing(rows, here) == "member"
    assert sorted(p.name for p in logs.iterdir()) == ["v1_recheck.log", "v1_shard0.log", "v1_shard1.log"]
    assert "pooled" in (tmp_path / "report.md").read_text()


def test_a_version_whose_runs_this_machines_check_does_not_match_is_left_and_the_next_runs(tmp_path, monkeypatch,
                                                                                             capsys):
    monkeypatch.delenv("FAKE_STUDY_WAIT", raising=False)
    monkeypatch.setenv("FAKE_STUDY_OFF", "0.5")
    plan, ledger = _fake_plan(tmp_path, {"v1": ["a", "b"], "v2": ["c"]})
    _elsewhere(ledger, "v1", "a")
    assert plan_module.continue_study(plan, ledger, tmp_path / "report.md", 2, tmp_path / "logs") == 1
    out = capsys.readouterr().out
    assert "v1: its runs come from Elsewhere CPU (AMX), and this machine's check" in out and "did not match" in out
    assert "left for other machines: v1 (its runs come from Elsewhere CPU (AMX))" in out
    rows = Ledger(ledger, "").rows()
    assert [(r["plan"], r["variant"], bool(r.get("recheck"))) for r in rows] == [
        ("v1", "a", False), ("v1", "a", True), ("v2", "c", False)]  # b is not started: it would stand apart
    assert plan_module.continue_study(plan, ledger, tmp_path / "report.md", 2, tmp_path / "logs") == 1
    assert len(Ledger(ledger, "").rows()) == 3  # checked once: not trained again


def test_a_signal_to_continue_reaches_each_shard_once_and_the_report_is_written(tmp_path):
    plan, ledger = _fake_plan(tmp_path, {"v1": ["a", "b"]})
    report, logs = tmp_path / "report.md", tmp_path / "logs"
    process = subprocess.Popen([sys.executable, "-m", "provq.ablation.plan", "--continue", "--plan", str(plan),
                                "--ledger", str(ledger), "--out", str(report), "--logs", str(logs)],
                               env={**os.environ, "FAKE_STUDY_WAIT": "1"}, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not all((tmp_path / f"ready{i}").exists() for i in (0, 1)) and time.time() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 3 and "Run the same command again to continue" in out
    for i in (0, 1):
        assert (logs / f"v1_shard{i}.log").read_text().count("got 15") == 1
    assert report.is_file() and not ledger.exists()  # no run finished: the ledger has no line


def test_this_code_gives_each_plan_versions_runs_the_recipe_their_ledger_lines_carry(tmp_path):
    """The committed study continues with this code: for every version of docs/results/study_plan.yaml
    whose ledger lines carry a recipe, its command resolves to that recipe here. A new config field or a
    changed default fails this (the runner would refuse the version's next run on the next machine):
    keep the old behaviour's hash, or plan a new version."""
    import shlex

    from training_helpers import REPO

    from provq.ablation.__main__ import build_parser, setting_of

    plan = plan_module.load_yaml(REPO / "docs" / "results" / "study_plan.yaml")
    rows = Ledger(REPO / "docs" / "results" / "ledger.jsonl", "").rows()
    checked = {}
    for name, version in plan["versions"].items():
        recipes = {r["recipe"] for r in rows if r["plan"] == name and r.get("recipe")}
        if not recipes or not version.get("command"):
            continue
        assert len(recipes) == 1, f"{name}: its lines carry several recipes {sorted(recipes)}"
        words = shlex.split(plan_module.version_command(version))
        words = words[words.index("provq.ablation") + 1:]
        words[words.index("--output_dir") + 1] = str(tmp_path / name)
        words[words.index("--ledger") + 1] = str(tmp_path / "ledger.jsonl")
        args = build_parser().parse_args(words)
        ablation = runner.Ablation(args, setting_of(args), tmp_path / name)
        checked[name] = ablation.recipe(args.first_seed)
        assert checked[name] == recipes.pop(), f"{name}: this code gives recipe {checked[name]}"
    assert "study-1" in checked  # the ledger holds study-1's runs: at least that one is checked
