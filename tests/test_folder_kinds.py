"""Every loader checks what kind of folder it was given first and names the kind it found and the
kind it wanted (issue 34): a prior passed as a tokenizer is a prior, not a reason to upgrade provq.
The folders are the real outputs of the commands; each wrong pairing goes through run_command."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
from training_helpers import (
    REPO,
    run_in_process,
    save_tiny_models,
    tiny_prior_argv,
    tiny_tokenizer_argv,
)

from generator import ARPrior
from provq.common.cli import run_command
from provq.common.errors import WrongFolderError
from provq.common.folders import folder_kind
from tokenizer import ProVQTokenizer

EMOJI32 = str(REPO / "configs" / "emoji32.yaml")
MAINS = {"train_tokenizer.py": "provq.commands.train_tokenizer", "train_prior.py": "provq.commands.train_prior",
         "extract_codes.py": "provq.commands.extract_codes",
         "sample.py": "provq.commands.sample", "python -m eval": "eval.__main__"}


@pytest.fixture(scope="module")
def folders(image_folder, tmp_path_factory) -> dict[str, Path]:
    """One folder of each kind, written by the commands: exports, codes, samples, two training runs."""
    from provq.commands import extract_codes, sample, train_prior, train_tokenizer

    root = tmp_path_factory.mktemp("kinds")
    save_tiny_models(root)
    run_in_process(extract_codes.main, ["--config", EMOJI32, "--tokenizer", str(root / "tok"), "--output_dir",
                                        str(root / "codes"), "--data.dataset", str(image_folder),
                                        "--data.resolution", "16"])
    run_in_process(sample.main, ["--tokenizer", str(root / "tok"), "--prior", str(root / "prior"), "--output_dir",
                                 str(root / "samples"), "--num_images", "2"])
    run_in_process(train_tokenizer.main, tiny_tokenizer_argv(image_folder, root / "tok_run", 1))
    run_in_process(train_prior.main, tiny_prior_argv(root / "codes", root / "prior_run", 1))
    return {name: root / name for name in ("tok", "prior", "codes", "samples", "tok_run", "prior_run")}


def test_each_folder_is_told_by_its_files(folders):
    kinds = {name: folder_kind(path).name for name, path in folders.items()}
    assert kinds == {"tok": "tokenizer", "prior": "prior", "codes": "codes", "samples": "samples",
                     "tok_run": "tokenizer run", "prior_run": "prior run"}
    assert folder_kind(folders["codes"] / "train").name == "codes split"
    assert folder_kind(folders["tok_run"] / "checkpoints" / "step_00000001").name == "checkpoint"


# name -> (command, its arguments from the folders f and an output folder o, the one line's message)
CASES = {
    "a prior as --tokenizer": (
        "extract_codes.py", lambda f, o: ["--config", EMOJI32, "--tokenizer", str(f["prior"]), "--output_dir", o],
        r"--tokenizer {prior} is a prior folder \(config.json model_type 'provq-ar-prior'\); expected a tokenizer "
        r"folder"),
    "a tokenizer as --prior": (
        "sample.py", lambda f, o: ["--tokenizer", str(f["tok"]), "--prior", str(f["tok"]), "--output_dir", o],
        r"--prior {tok} is a tokenizer folder \(config.json model_type 'provq-tokenizer'\); expected a prior folder"),
    "a training run as --tokenizer": (
        "sample.py", lambda f, o: ["--tokenizer", str(f["tok_run"]), "--prior", str(f["prior"]), "--output_dir", o],
        r"--tokenizer {tok_run} is a tokenizer training run \(train_tokenizer.py's output_dir\) \(config.yaml has a "
        r"tokenizer: section\); expected a tokenizer folder: its export is {tok_run}/tokenizer"),
    "codes as --tokenizer": (
        "python -m eval", lambda f, o: ["rfid", "--tokenizer", str(f["codes"]), "--out", f"{o}/rfid.json"],
        r"--tokenizer {codes} is a codes folder \(extract_codes.py's output\) \(tokenizer.json or "
        r"<split>/manifest.json\); expected a tokenizer folder"),
    "a tokenizer as --codes": (
        "train_prior.py", lambda f, o: ["--config", EMOJI32, "--codes", str(f["tok"]), "--output_dir", o],
        r"--codes {tok} is a tokenizer folder \(config.json model_type 'provq-tokenizer'\); expected a codes folder "
        r"\(extract_codes.py's output\)"),
    "one split as --codes": (
        "train_prior.py", lambda f, o: ["--config", EMOJI32, "--codes", str(f["codes"] / "train"), "--output_dir", o],
        r"--codes {codes}/train is one split of a codes folder \(manifest.json\); expected a codes folder "
        r"\(extract_codes.py's output\): pass its parent {codes}"),
    "a samples folder as --samples": (
        "python -m eval", lambda f, o: ["gfid", "--samples", str(f["samples"]), "--ref", str(f["samples"]),
                                        "--out", f"{o}/gfid.json"],
        r"--samples {samples} is a samples folder \(sample.py's output\) \(samples.npz\); expected a samples .npz, a "
        r"statistics .npz or a folder of images: pass {samples}/samples.npz"),
    "a tokenizer as --card": (
        "python -m eval", lambda f, o: ["gfid", "--samples", str(f["samples"] / "samples.npz"), "--ref",
                                        str(f["samples"] / "samples.npz"), "--card", str(f["tok"])],
        r"--card {tok} is a tokenizer folder \(config.json model_type 'provq-tokenizer'\); expected a prior folder"),
    "a prior as --init_from": (
        "train_tokenizer.py", lambda f, o: ["--config", EMOJI32, "--output_dir", o, "--init_from", str(f["prior"])],
        r"--init_from {prior} is a prior folder \(config.json model_type 'provq-ar-prior'\); expected a tokenizer "
        r"folder"),
    "a run as --resume": (
        "train_tokenizer.py", lambda f, o: ["--config", EMOJI32, "--output_dir", o, "--resume", str(f["tok_run"])],
        r"--resume {tok_run} is a tokenizer training run \(train_tokenizer.py's output_dir\) \(config.yaml has a "
        r"tokenizer: section\); expected a training checkpoint: use --resume latest, or one of "
        r"{tok_run}/checkpoints/step_\*"),
    "a prior run as --output_dir": (
        "train_tokenizer.py", lambda f, o: ["--config", EMOJI32, "--output_dir", str(f["prior_run"])],
        r"--output_dir {prior_run} is a prior training run \(train_prior.py's output_dir\) \(config.yaml has a prior: "
        r"section\); expected a tokenizer training run \(train_tokenizer.py's output_dir\) or a new folder"),
    "codes as --output_dir": (
        "sample.py", lambda f, o: ["--tokenizer", str(f["tok"]), "--prior", str(f["prior"]), "--output_dir",
                                   str(f["codes"])],
        r"--output_dir {codes} is a codes folder \(extract_codes.py's output\) \(tokenizer.json or "
        r"<split>/manifest.json\); expected a samples folder \(sample.py's output\) or a new folder"),
}


def snapshot(folders: dict[str, Path]) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for folder in folders.values() for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_folder_of_another_kind_is_named_with_the_kind_wanted(case, folders, image_folder, tmp_path, capsys):
    command, argv, message = CASES[case]
    out = tmp_path / "out"
    argv = argv(folders, str(out))
    if command == "train_tokenizer.py":
        argv += tiny_tokenizer_argv(image_folder, out, 1)[4:]  # the data and model: only the folders are wrong
    before = snapshot(folders)
    main = importlib.import_module(MAINS[command]).main
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run_in_process(lambda args: run_command(command, main, args), argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert stopped.value.code == 2 and "Traceback" not in "\n".join(lines)
    expected = f"{command}: error: " + message.format(**{k: str(v) for k, v in folders.items()})
    assert any(re.fullmatch(expected, line) for line in lines), lines[-3:]
    assert "upgrade" not in lines[-1]
    assert not out.exists() and snapshot(folders) == before  # refused before anything was written


def test_the_library_loaders_name_the_kind_too(folders):
    with pytest.raises(WrongFolderError, match=rf"^{folders['prior']} is a prior folder .* expected a tokenizer folder$"):
        ProVQTokenizer.from_pretrained(folders["prior"])
    with pytest.raises(WrongFolderError, match="is a tokenizer folder .* expected a prior folder"):
        ARPrior.read_config(folders["tok"] / "config.json")
