"""User errors through the real command lines: one line `<command>: error: ...`, exit status 2, no
traceback, nothing half-written. A bug keeps its traceback; PROVQ_DEBUG=1 shows one for user errors too."""

from __future__ import annotations

import importlib
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from training_helpers import REPO, run_in_process, subprocess_env, tiny_tokenizer_argv

from generator import ARPrior, PriorConfig
from tokenizer import ProVQTokenizer, QuantizerConfig, TokenizerConfig

EMOJI32 = str(REPO / "configs" / "emoji32.yaml")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny tokenizer and a prior bound to it; a truncated and a pickled copy of the tokenizer."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    tok = ProVQTokenizer(TokenizerConfig(resolution=16, base_channels=8, channel_multipliers=[1, 2],
                                         latent_channels=8, norm_num_groups=4,
                                         quantizer=QuantizerConfig(codebook_size=16, codebook_dim=4)))
    tok.save_pretrained(root / "tok")
    ARPrior(PriorConfig(codebook_size=16, code_height=8, code_width=8, num_classes=4, hidden_size=32,
                        num_layers=1, num_heads=2, intermediate_size=64,
                        tokenizer_fingerprint=tok.fingerprint())).save_pretrained(root / "prior")
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
    "train_tokenizer.py": ("train_tokenizer", ["train_tokenizer.py"]),
    "extract_codes.py": ("extract_codes", ["extract_codes.py"]),
    "sample.py": ("sample", ["sample.py"]),
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
    from common.cli import run_command

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
    from common.cli import run_command
    from common.errors import ConfigError

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
