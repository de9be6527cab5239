"""User errors through the real command lines: one line `<command>: error: ...`, exit status 2, no
traceback, nothing half-written. A bug keeps its traceback; PROVQ_DEBUG=1 shows one for user errors too."""

from __future__ import annotations

import importlib
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file
from training_helpers import (
    REPO,
    run_in_process,
    save_tiny_models,
    subprocess_env,
    tiny_tokenizer_argv,
)

EMOJI32 = str(REPO / "configs" / "emoji32.yaml")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny tokenizer and a prior bound to it; a truncated and a pickled copy of the tokenizer."""
    root = tmp_path_factory.mktemp("models")
    save_tiny_models(root)
    whole = (root / "tok" / "model.safetensors").read_bytes()
    for name, payload in (("truncated", whole[: len(whole) // 2]), ("pickled", pickle.dumps({"w": [1, 2]}))):
        (root / name).mkdir()
        (root / name / "config.json").write_bytes((root / "tok" / "config.json").read_bytes())
        (root / name / "model.safetensors").write_bytes(payload)
    return {name: root / name for name in ("tok", "prior", "truncated", "pickled")}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("files")
    (root / "empty").mkdir()
    np.savez(root / "no_arr_0.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    folder = root / "images"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    return {"empty": root / "empty", "no_arr_0": root / "no_arr_0.npz", "images": folder}


def sample_argv(models, out, *extra):
    return ["--tokenizer", str(models["tok"]), "--prior", str(models["prior"]),
            "--output_dir", str(out), "--num_images", "2", *extra]


def extract_argv(tokenizer, files, out):
    return ["--config", EMOJI32, "--tokenizer", str(tokenizer), "--output_dir", str(out),
            "--data.dataset", str(files["images"]), "--data.resolution", "16"]


# command -> (module with main(argv), how a process starts it)
ENTRY_POINTS = {
    "train_tokenizer.py": ("provq.commands.train_tokenizer", ["train_tokenizer.py"]),
    "extract_codes.py": ("provq.commands.extract_codes", ["extract_codes.py"]),
    "sample.py": ("provq.commands.sample", ["sample.py"]),
    "python -m eval": ("eval.__main__", ["-m", "eval"]),
}
# name -> (arguments, command, the message its one line must say)
CASES = {
    "section typo": (lambda m, f, out: [*tiny_tokenizer_argv(f["images"], out, 2), "--no_such.field", "3"],
                     "train_tokenizer.py", "--no_such.field: this command reads no section 'no_such'"),
    "unknown field": (lambda m, f, out: [*tiny_tokenizer_argv(f["images"], out, 2), "--tokenizer.model.nope", "1"],
                      "train_tokenizer.py", "unknown config field 'tokenizer.model.nope'"),
    "empty folder": (lambda m, f, out: tiny_tokenizer_argv(f["empty"], out, 2),
                     "train_tokenizer.py", "has no images"),
    "unknown flag": (lambda m, f, out: [*extract_argv(m["tok"], f, out), "--max_steps", "3"],
                     "extract_codes.py", "unrecognized argument: --max_steps"),
    "truncated weights": (lambda m, f, out: extract_argv(m["truncated"], f, out),
                          "extract_codes.py", "not a complete safetensors file"),
    "pickle as safetensors": (lambda m, f, out: extract_argv(m["pickled"], f, out),
                              "extract_codes.py", "pickle/.bin checkpoint renamed"),
    "label out of range": (lambda m, f, out: sample_argv(m, out, "--labels", "9999"),
                           "sample.py", r"--labels \[9999\] outside the prior's classes \[0, 4\)"),
    "top_p 0": (lambda m, f, out: sample_argv(m, out, "--top_p", "0"),
                "sample.py", r"top_p must be in \(0, 1\], got 0.0"),
    "negative cfg": (lambda m, f, out: sample_argv(m, out, "--cfg_scale", "-1"),
                     "sample.py", "cfg_scale must be >= 0, got -1.0"),
    "npz without arr_0": (lambda m, f, out: ["gfid", "--samples", str(f["no_arr_0"]), "--ref", str(f["no_arr_0"]),
                                             "--out", str(out / "gfid.json")],
                          "python -m eval", "has no 'arr_0'"),
}
# One real process per entry point; the other cases run in this process (the same run_command path).
IN_A_PROCESS = {"section typo", "truncated weights", "label out of range", "npz without arr_0"}


def run(argv: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, env={**subprocess_env(), **env},
                          capture_output=True, text=True, timeout=300)


def run_here(command: str, argv: list[str], capsys) -> tuple[int, str]:
    """run_command(command, main, argv) in this process: (exit status, what it printed on stderr)."""
    from provq.common.cli import run_command

    main = importlib.import_module(ENTRY_POINTS[command][0]).main
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(lambda args: run_command(command, main, args), argv)
    return exit_info.value.code, capsys.readouterr().err


def check_one_line(code: int, stderr: str, command: str, message: str, out: Path) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in lines if line.startswith(f"{command}: error: ")]
    assert len(errors) == 1, lines
    assert re.search(message, errors[0]), errors[0]
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))  # nothing half-written


@pytest.mark.parametrize("case", sorted(set(CASES) - IN_A_PROCESS))
def test_a_user_error_is_one_line_and_exit_status_2(case, models, files, tmp_path, capsys):
    build, command, message = CASES[case]
    out = tmp_path / "out"
    code, stderr = run_here(command, build(models, files, out), capsys)
    check_one_line(code, stderr, command, message, out)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(IN_A_PROCESS))
def test_a_user_error_of_a_real_process_is_one_line_and_exit_status_2(case, models, files, tmp_path):
    build, command, message = CASES[case]
    out = tmp_path / "out"
    done = run([*ENTRY_POINTS[command][1], *build(models, files, out)])
    check_one_line(done.returncode, done.stderr, command, message, out)


@pytest.mark.slow
def test_provq_debug_shows_the_traceback_of_a_user_error(models, tmp_path):
    done = run(["sample.py", *sample_argv(models, tmp_path / "out", "--top_p", "0")], PROVQ_DEBUG="1")
    assert done.returncode == 1 and "Traceback" in done.stderr and "top_p must be in" in done.stderr


@pytest.mark.slow
def test_under_torchrun_the_error_is_printed_once(files, tmp_path):
    argv = [*tiny_tokenizer_argv(files["images"], tmp_path / "out", 2), "--tokenizer.model.nope", "1"]
    done = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train_tokenizer.py",
                *argv])
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if "train_tokenizer.py: error: " in line]
    assert len(lines) == 1, done.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_run_command_turns_only_user_errors_into_one_line(capsys):
    from provq.common.cli import run_command
    from provq.common.errors import ConfigError

    def bug(argv):
        raise KeyError("a bug")

    def user_error(argv):
        raise ConfigError("a bad value\nspread over lines")

    with pytest.raises(KeyError, match="a bug"):  # a bug keeps its traceback
        run_command("tool", bug, [])
    with pytest.raises(SystemExit) as exit_info:
        run_command("tool", user_error, [])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "tool: error: a bad value spread over lines\n"


# ---- values that parse but make no sense, damaged files, paths that are files, malformed YAML -------------
def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture(scope="module")
def trained(models, files, image_folder, tmp_path_factory) -> dict[str, Path]:
    """A tokenizer run with checkpoints after steps 1 and 2, and codes of the image folder."""
    from provq.commands import extract_codes, train_tokenizer

    root = tmp_path_factory.mktemp("trained")
    run_in_process(train_tokenizer.main, tiny_tokenizer_argv(image_folder, root / "tok", 2, train__save_every=1))
    run_in_process(extract_codes.main, extract_argv(models["tok"], {"images": image_folder}, root / "codes"))
    return {"run": root / "tok", "codes": root / "codes"}


BAD_VALUES = {
    "nan learning rate": ("train_tokenizer.py", ["--tokenizer.train.lr", "nan"],
                          r"tokenizer.train.lr: expected a finite number, got 'nan'"),
    "infinite weight": ("train_tokenizer.py", ["--tokenizer.loss.reconstruction_weight", ".inf"],
                        r"reconstruction_weight: expected a finite number"),
    "negative count": ("train_tokenizer.py", ["--tokenizer.train.warmup_steps", "-1"],
                       r"warmup_steps must be >= 0, got -1"),
    "probability above 1": ("train_tokenizer.py", ["--tokenizer.train.ema_decay", "1.5"],
                            r"ema_decay must be in \[0, 1\], got 1.5"),
    "negative workers": ("train_tokenizer.py", ["--data.num_workers", "-2"], r"num_workers must be >= 0, got -2"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_a_number_outside_its_meaning_is_refused_before_anything_is_written(case, files, tmp_path, capsys):
    command, extra, message = BAD_VALUES[case]
    out = tmp_path / "out"
    code, stderr = run_here(command, [*tiny_tokenizer_argv(files["images"], out, 2), *extra], capsys)
    check_one_line(code, stderr, command, message, out)


def test_an_infinite_sampling_setting_is_refused(models, tmp_path, capsys):
    out = tmp_path / "out"
    code, stderr = run_here("sample.py", sample_argv(models, out, "--temperature", "inf"), capsys)
    check_one_line(code, stderr, "sample.py", r"sample.temperature: expected a finite number, got inf", out)


@pytest.mark.parametrize("command", ["train_tokenizer.py", "sample.py", "extract_codes.py"])
def test_an_output_dir_that_is_a_file_is_refused_and_kept(command, models, files, tmp_path, capsys):
    existing = tmp_path / "notes.txt"
    existing.write_text("my notes")
    argv = {"train_tokenizer.py": lambda: tiny_tokenizer_argv(files["images"], existing, 2),
            "sample.py": lambda: sample_argv(models, existing),
            "extract_codes.py": lambda: extract_argv(models["tok"], files, existing)}[command]()
    code, stderr = run_here(command, argv, capsys)
    check_one_line(code, stderr, command, rf"--output_dir {existing} is an existing file", tmp_path / "none")
    assert existing.read_text() == "my notes"


def test_a_config_that_is_not_yaml_is_one_line_naming_the_line(files, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tokenizer:\n  train:\n    lr: [1e-4\n    batch_size: 8\n")
    argv = tiny_tokenizer_argv(files["images"], tmp_path / "out", 2)
    argv[argv.index("--config") + 1] = str(bad)
    code, stderr = run_here("train_tokenizer.py", argv, capsys)
    check_one_line(code, stderr, "train_tokenizer.py", rf"{bad} is not valid YAML: .* at line \d+", tmp_path / "out")


def test_resuming_from_a_damaged_checkpoint_names_it_and_the_ones_that_load(trained, image_folder, tmp_path, capsys):
    run = tmp_path / "tok"
    shutil.copytree(trained["run"], run)
    truncate(run / "checkpoints" / "step_00000002" / "model.safetensors")
    before = snapshot(run)
    argv = [*tiny_tokenizer_argv(image_folder, run, 4, train__save_every=1), "--resume", "latest"]
    code, stderr = run_here("train_tokenizer.py", argv, capsys)
    assert code == 2 and "Traceback" not in stderr
    assert re.search(r"checkpoint .*step_00000002 is damaged \(model.safetensors cannot be read whole\); resume "
                     r"from an earlier one that loads: --resume .*step_00000001", stderr), stderr
    assert snapshot(run) == before  # nothing written, nothing overwritten


def test_training_the_prior_on_a_damaged_shard_names_it(trained, models, image_folder, tmp_path, capsys):
    from generator import CodeDataset
    from provq.commands import extract_codes, train_prior
    from provq.common.cli import run_command

    codes = tmp_path / "codes"
    shutil.copytree(trained["codes"], codes)
    shard = sorted((codes / "train").glob("shard-*.safetensors"))[0]
    whole = load_file(str(shard))
    truncate(shard)
    argv = ["--config", EMOJI32, "--codes", str(codes), "--output_dir", str(tmp_path / "prior"),
            "--max_steps", "1", "--prior.train.compile", "false"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_in_process(lambda args: run_command("train_prior.py", train_prior.main, args), argv)
    check_one_line(2, capsys.readouterr().err, "train_prior.py",
                   rf"code shard {shard} is damaged .*rerun extract_codes.py", tmp_path / "prior")
    # what the message promises: extraction again rewrites the damaged shard and keeps the others
    kept = {p: p.read_bytes() for p in codes.rglob("shard-*") if p != shard}
    run_in_process(extract_codes.main, extract_argv(models["tok"], {"images": image_folder}, codes))
    rewritten = load_file(str(shard))
    assert all(np.array_equal(rewritten[k], whole[k]) for k in ("codes", "labels"))
    assert all(p.read_bytes() == b for p, b in kept.items())
    assert len(CodeDataset(codes, "train")) > 0


@pytest.mark.parametrize("damage", ["truncated", "empty", "text"])
@pytest.mark.parametrize("which", ["--samples", "--ref"])
def test_a_damaged_npz_is_named_before_any_work(damage, which, files, tmp_path, capsys):
    good = tmp_path / "good.npz"
    np.savez(good, arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    bad = tmp_path / "bad.npz"
    bad.write_bytes({"truncated": good.read_bytes()[:300], "empty": b"", "text": b"mu,sigma\n1,2\n"}[damage])
    argv = ["gfid", "--samples", str(good), "--ref", str(good), "--out", str(tmp_path / "out" / "gfid.json")]
    argv[argv.index(which) + 1] = str(bad)
    code, stderr = run_here("python -m eval", argv, capsys)
    check_one_line(code, stderr, "python -m eval", rf"{bad} is not a complete .npz file", tmp_path / "out")
    assert "samples:" not in stderr  # refused before any image went through Inception


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_tokenizer_config_is_named(damage, models, files, tmp_path, capsys):
    folder = tmp_path / "tok"
    shutil.copytree(models["tok"], folder)
    config = folder / "config.json"
    config.write_text("" if damage == "empty" else config.read_text()[:40])
    code, stderr = run_here("extract_codes.py", extract_argv(folder, files, tmp_path / "out"), capsys)
    check_one_line(code, stderr, "extract_codes.py", rf"{config} is not a JSON file", tmp_path / "out")


def test_a_damaged_codes_manifest_is_named(trained, tmp_path, capsys):
    codes = tmp_path / "codes"
    shutil.copytree(trained["codes"], codes)
    (codes / "train" / "manifest.json").write_text('{"format_version": 1, "tokenizer_finger')
    from provq.commands import train_prior
    from provq.common.cli import run_command

    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_in_process(lambda args: run_command("train_prior.py", train_prior.main, args),
                       ["--config", EMOJI32, "--codes", str(codes), "--output_dir", str(tmp_path / "prior")])
    check_one_line(2, capsys.readouterr().err, "train_prior.py", r"manifest.json is not a JSON file",
                   tmp_path / "prior")


@pytest.mark.parametrize("damage, message", [("empty", "is empty: not a checkpoint"),
                                             ("truncated", "is not a complete torch checkpoint")])
def test_a_damaged_published_checkpoint_is_named(damage, message, tmp_path, capsys):
    from provq.common.cli import run_command
    from tokenizer import convert

    checkpoint = tmp_path / "vq_ds16_c2i.pt"
    torch.save({"model": {"w": torch.zeros(64, 64)}}, checkpoint)
    checkpoint.write_bytes(b"" if damage == "empty" else checkpoint.read_bytes()[:200])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_command("python -m tokenizer.convert", convert.main,
                    ["--from", "llamagen", str(checkpoint), "--output_dir", str(tmp_path / "out")])
    check_one_line(2, capsys.readouterr().err, "python -m tokenizer.convert", message, tmp_path / "out")


def test_a_damaged_statistics_cache_file_is_computed_again(files, tmp_path, monkeypatch, caplog):
    from eval import stats_cache
    from eval.__main__ import main as eval_main

    monkeypatch.setenv("PROVQ_STATS_CACHE", str(tmp_path / "cache"))
    argv = ["stats", "--dataset", str(files["images"]), "--split", "train", "--resolution", "16",
            "--out", str(tmp_path / "a.npz")]
    first = run_in_process(eval_main, argv)
    cached = sorted((tmp_path / "cache").glob("*.npz"))
    assert len(cached) == 1 and first["cached"] is False
    truncate(cached[0])
    again = run_in_process(eval_main, [*argv[:-1], str(tmp_path / "b.npz")])
    assert again["cached"] is False and "ignoring a damaged statistics cache file" in caplog.text
    assert stats_cache.cached is not None and np.array_equal(np.load(tmp_path / "a.npz")["mu"],
                                                             np.load(tmp_path / "b.npz")["mu"])
