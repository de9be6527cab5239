"""The benchmarks that CI can run at tiny sizes: they must keep running, and write what they claim."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from training_helpers import REPO, subprocess_env


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_and_writes_its_figures(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(out)], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["sizes"]["preset"] == "emoji32"  # the CPU sizes; a GPU runs imagenet256's
    assert result["tokenizer"]["images_per_s"] > 0 and result["prior"]["tokens_per_s"] > 0
    assert 0 < result["prior"]["mfu_vs_measured_matmul"] < 1
    assert result["prior"]["model_flops_per_token"] > 6 * 3e6  # 6 N for a ~3.7M-parameter prior
    assert result["sampling"]["codes_in_range"] and result["sampling"]["images"] == 2
    assert result["inception"]["finite"] and result["inception"]["images_per_s"] > 0
    assert result["any_nonfinite_loss"] is False


@pytest.mark.slow
def test_the_study_unit_bench_times_the_studys_own_run_and_writes_runs_per_hour(tmp_path, image_folder):
    out, preset = tmp_path / "study_unit.json", tmp_path / "fp32.yaml"  # the study's bf16 refuses AVX2-only CPUs
    preset.write_text(f"base: {REPO / 'configs' / 'emoji32.yaml'}\ntokenizer:\n  train: {{mixed_precision: 'no'}}\n")
    done = subprocess.run([sys.executable, "-m", "bench.study_unit", "--arms", "eager", "--steps", "2",
                           "--dataset", str(image_folder), "--resolution", "16", "--config", str(preset),
                           "--work", str(tmp_path / "work"), "--out", str(out)], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    eager = result["results"]["eager"]
    assert set(eager["stages_s"]) == {"tokenizer", "rFID"} and eager["wall_s"] > sum(eager["stages_s"].values()) / 2
    assert eager["runs_per_hour"] == pytest.approx(2 * 3600 / eager["wall_s"], rel=0.01)
    assert 0 < eager["metrics"]["codebook_usage"] <= 1 and eager["metrics"]["psnr"] > 5
    assert result["cpu"]["model"] and result["torch"]  # where it ran, for every figure
    assert result["config"] == str(preset) and "mixed_precision: 'no'" in (tmp_path / "work" / "eager" / (
        "cosine+kmeans+l2") / "seed0" / "tok" / "config.yaml").read_text().replace('"', "'")



def test_time_to_quality_pairs_each_arm_with_base_by_seed_and_compares_seconds():
    from bench.time_to_quality import summary

    def run(tok_s, rfid_s, rfid, psnr, usage):
        return {"seconds": {"tokenizer": tok_s, "rFID": rfid_s},
                "metrics": {"rfid": rfid, "psnr": psnr, "codebook_usage": usage}}

    runs = {"base": {1: run(300, 60, 100.0, 22.0, 0.9), 2: run(300, 60, 110.0, 22.4, 0.8)},
            "batch16": {1: run(150, 60, 104.0, 21.8, 0.9), 2: run(150, 60, 112.0, 22.0, 0.9),
                        3: run(150, 60, 999.0, 0.0, 0.0)}}  # seed 3 has no base: not paired
    found = summary(runs)
    assert found["base"]["wall_s_mean"] == 360.0 and "minus_base" not in found["base"]
    arm = found["batch16"]
    assert arm["wall_ratio_to_base"] == round(420 / 720, 3)  # seeds 1 and 2 only
    rfid = arm["minus_base"]["rfid"]
    assert rfid["n"] == 2 and rfid["mean"] == pytest.approx(3.0)  # (4 + 2) / 2
    # t(0.975, 1 df) = 12.706; sd of (4, 2) = sqrt(2); half width = 12.706 * sqrt(2) / sqrt(2)
    assert rfid["ci95"] == pytest.approx([3.0 - 12.7062, 3.0 + 12.7062], abs=1e-3)
    assert arm["minus_base"]["psnr"]["mean"] == pytest.approx(-0.3)
    assert arm["minus_base"]["codebook_usage"]["mean"] == pytest.approx(0.05)


def test_the_test_suite_bench_reads_pytests_last_line():
    from bench.test_suite import summary_line

    found = summary_line("....\n476 passed, 80 warnings in 416.94s (0:06:56)\n")
    assert found["pytest_s"] == 416.94 and found["passed"] == 476
    found = summary_line("x\n2 failed, 424 passed, 49 deselected in 84.89s (0:01:24)")
    assert (found["failed"], found["passed"], found["deselected"], found["pytest_s"]) == (2, 424, 49, 84.89)
    assert summary_line("")["pytest_s"] is None


def test_the_test_suite_bench_keeps_the_slowest_tests_and_runs_this_tree_alone_without_before(tmp_path, monkeypatch):
    import bench.test_suite as suite

    output = ("=== slowest 15 durations ===\n"  # as the fresh-clone CI run printed them
              "110.28s call     tests/test_recipe.py::test_the_imagenet256_recipe_runs_at_its_real_shapes\n"
              "22.25s call     tests/test_scripts.py::test_each_lookup_free_family[lfq-fields1-32]\n"
              "3.10s setup    tests/test_app.py::test_x\n512 passed, 77 warnings in 417.16s (0:06:57)\n")
    assert suite.slowest(output) == [
        {"seconds": 110.28, "phase": "call", "test": "tests/test_recipe.py::test_the_imagenet256_recipe_runs_at_its_real_shapes"},
        {"seconds": 22.25, "phase": "call", "test": "tests/test_scripts.py::test_each_lookup_free_family[lfq-fields1-32]"},
        {"seconds": 3.10, "phase": "setup", "test": "tests/test_app.py::test_x"}]
    ran = []
    monkeypatch.setattr(suite, "run", lambda command, cwd: ran.append((command, cwd)) or {"pytest_s": 1.0})
    result = suite.main(["--subsets", "fast,full", "--out", str(tmp_path / "now.json")])
    assert [cwd for _, cwd in ran] == [suite.REPO, suite.REPO]  # no scratch worktree: this tree only
    assert all("-n " in c and "--durations=15" in c for c, _ in ran) and '-m "not slow"' in ran[0][0]
    assert set(result["results"]) == {"after_fast", "after_full"} and result["before"] is None
    assert json.loads((tmp_path / "now.json").read_text())["cpu"]["model"]


QUICK_TEST = "tests/test_house_style.py::test_libraries_do_not_import_each_other"


@pytest.mark.slow
@pytest.mark.parametrize("runner,subset", [("serial", "fast"), ("xdist", "full")])
def test_the_test_suite_bench_runs_an_old_commit_beside_this_tree(tmp_path, runner, subset):
    out = tmp_path / "test_suite.json"
    # one quick test of each tree (it only has to run and be counted): the bench, not the suite, is under test
    done = subprocess.run([sys.executable, "-m", "bench.test_suite", "--before", "HEAD", "--paths",
                           QUICK_TEST, "--before_runner", runner, "--subsets", subset,
                           "--scratch", str(tmp_path), "--out", str(out)], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["results"]) == {f"before_{subset}", f"after_{subset}"}
    for name, found in result["results"].items():
        assert found["rc"] == 0 and found["passed"] > 0 and found["pytest_s"] > 0, (name, found)
        # the old serial command or the Makefile's xdist one before, always xdist after
        assert ("-n " in found["command"]) == (name.startswith("after") or runner == "xdist")
        assert ('-m "not slow"' in found["command"]) == (subset == "fast")
    assert result["speedup"][subset] > 0 and result["cpu"]["model"] and result["before_runner"] == runner
    listed = subprocess.run(["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in listed and not list(tmp_path.glob("provq-before-*"))  # its scratch worktree is gone


def test_the_frechet_bench_times_each_route_and_compares_it_with_the_exact_value(tmp_path, monkeypatch):
    import bench.frechet as frechet

    monkeypatch.setattr(frechet, "DIM", 64)
    monkeypatch.setattr(frechet, "CASES", {"few images": (20, 30), "full rank": (200, 300)})
    result = frechet.main(["--repeats", "1", "--out", str(tmp_path / "frechet.json")])
    assert json.loads((tmp_path / "frechet.json").read_text())["results"] == result["results"]
    few, full = result["results"]["few images"], result["results"]["full rank"]
    assert few["exact"] > 0 and abs(few["cholesky"]["minus_exact"]) < 1e-9 * few["exact"]
    assert full["exact"] is None and full["cholesky"]["minus_exact"] is None
    assert full["cholesky"]["fid"] == pytest.approx(full["sqrtm"]["fid"], rel=1e-8)
    assert {"seconds", "fid"} <= set(full["eigh"]) and result["cpu"]["model"]


def test_the_channels_last_bench_times_one_function_in_both_layouts(tmp_path):
    import bench.channels_last as channels_last

    result = channels_last.main(["--steps", "2", "--warmup", "1", "--precisions", "fp32",
                                 "--out", str(tmp_path / "channels_last.json")])
    assert json.loads((tmp_path / "channels_last.json").read_text())["results"] == result["results"]
    fp32 = result["results"]["fp32"]
    assert fp32["first_step_loss"]["channels_last"] == pytest.approx(fp32["first_step_loss"]["contiguous"], rel=1e-4)
    assert fp32["channels_last_speedup"] > 0 and result["cpu"]["model"]


@pytest.mark.slow
def test_the_command_start_bench_times_help_here_and_at_an_old_commit(tmp_path):
    out = tmp_path / "command_start.json"
    done = subprocess.run([sys.executable, "-m", "bench.command_start", "--before", "HEAD", "--repeats", "1",
                           "--commands", "provq-data", "--scratch", str(tmp_path), "--out", str(out)], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    found = result["commands"]["provq-data"]
    assert found["before_s"] > 0 and found["after_s"] > 0
    assert found["speedup"] == pytest.approx(found["before_s"] / found["after_s"], rel=0.02)
    assert result["total_s"]["after"] == found["after_s"] and result["cpu"]["model"]
    listed = subprocess.run(["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in listed and not list(tmp_path.glob("provq-before-*"))  # its scratch worktree is gone
