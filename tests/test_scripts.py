"""The stage-2 scripts end to end, in-process: extract_codes.py, sample.py, train_prior.py's refusal.

Untrained tiny models (a 16 px tokenizer with 8x8 codes of 16, a 2-layer prior): the scripts'
files, bindings and errors are under test here, not image quality.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file
from training_helpers import (
    REPO,
    logged_steps,
    run_in_process,
    tiny_prior_argv,
    tiny_tokenizer_argv,
)

from generator import (
    ARPrior,
    CodeDataset,
    FingerprintMismatchError,
    PriorConfig,
    load_manifest,
    sampling,
)
from provq.commands import extract_codes, sample, train_prior
from provq.common.folders import TOKENIZER_RECORD
from tokenizer import ProVQTokenizer, QuantizerConfig, TokenizerConfig

CLASSES = 4  # of the image_folder fixture


def save_tiny_tokenizer(folder, seed: int):
    torch.manual_seed(seed)
    config = TokenizerConfig(resolution=16, base_channels=8, channel_multipliers=[1, 2],
                             latent_channels=8, norm_num_groups=4,
                             quantizer=QuantizerConfig(codebook_size=16, codebook_dim=4))
    tok = ProVQTokenizer(config)
    tok.save_pretrained(folder)
    return folder, tok.fingerprint()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """(folder, fingerprint) of a tiny untrained tokenizer."""
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer", seed=0)


@pytest.fixture(scope="module")
def prior(tokenizer, tmp_path_factory):
    """A tiny untrained prior bound to `tokenizer` (the fingerprint train_prior.py would record)."""
    torch.manual_seed(0)
    config = PriorConfig(codebook_size=16, code_height=8, code_width=8, num_classes=CLASSES,
                         hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                         tokenizer_fingerprint=tokenizer[1])
    folder = tmp_path_factory.mktemp("prior") / "prior"
    ARPrior(config).save_pretrained(folder)
    return folder


def extract_argv(tokenizer_folder, dataset, out, *extra) -> list[str]:
    return ["--config", str(REPO / "configs" / "emoji32.yaml"), "--output_dir", str(out),
            "--tokenizer", str(tokenizer_folder), "--data.dataset", str(dataset),
            "--data.resolution", "16", "--batch_size", "32", *extra]


@pytest.fixture(scope="module")
def codes(tokenizer, image_folder, tmp_path_factory):
    """Codes of the tiny image folder in shards of 32 images (3 train shards, 1 test shard)."""
    out = tmp_path_factory.mktemp("codes")
    run_in_process(extract_codes.main, extract_argv(tokenizer[0], image_folder, out, "--shard_size", "32"))
    return out


def sample_argv(tokenizer_folder, prior_folder, out, *extra) -> list[str]:
    return ["--tokenizer", str(tokenizer_folder), "--prior", str(prior_folder),
            "--output_dir", str(out), "--num_images", "8", "--batch_size", "4", *extra]


# ---- extract_codes.py -----------------------------------------------------------------------
def test_extract_codes_manifest_records_the_tokenizer(codes, tokenizer):
    sizes = {}
    for split in ("train", "test"):
        manifest = load_manifest(codes, split)
        assert manifest.tokenizer_fingerprint == tokenizer[1]
        assert manifest.code_shape == (8, 8) and manifest.codebook_size == 16
        assert manifest.num_classes == CLASSES and manifest.shard_size == 32
        assert len(manifest.shards) == manifest.num_shards == -(-manifest.num_items // 32)
        sizes[split] = manifest.num_items
    assert sum(sizes.values()) == 96 and sizes["train"] > 64  # 3 train shards


def test_extract_codes_rerun_keeps_finished_shards(codes, tokenizer, image_folder, tmp_path):
    work = tmp_path / "codes"
    shutil.copytree(codes, work)
    shards = sorted((work / "train").glob("shard-*.safetensors"))
    assert len(shards) == 3
    shards[1].unlink()  # as if the run had been killed before writing it
    before = {p.name: p.stat().st_mtime_ns for p in shards if p.exists()}
    run_in_process(extract_codes.main, extract_argv(tokenizer[0], image_folder, work, "--shard_size", "32"))
    after = {p.name: p.stat().st_mtime_ns for p in (work / "train").glob("shard-*.safetensors")}
    assert {name: after[name] for name in before} == before  # finished shards were not rewritten
    assert set(after) == {p.name for p in shards}  # the missing one was
    rewritten, original = (load_file(str(root / "train" / shards[1].name)) for root in (work, codes))
    assert all(np.array_equal(rewritten[k], original[k]) for k in ("codes", "labels"))


def test_extract_codes_refuses_another_resolution(tokenizer, image_folder, tmp_path):
    argv = extract_argv(tokenizer[0], image_folder, tmp_path / "codes")
    argv[argv.index("--data.resolution") + 1] = "32"
    with pytest.raises(ValueError, match=r"data.resolution is 32 but the tokenizer was trained at 16"):
        run_in_process(extract_codes.main, argv)


# ---- train_prior.py -------------------------------------------------------------------------
def test_train_prior_refuses_codes_of_another_tokenizer(codes, tokenizer, tmp_path):
    configured = "f" * 64
    argv = tiny_prior_argv(codes, tmp_path / "run", 2, model__tokenizer_fingerprint=configured)
    with pytest.raises(FingerprintMismatchError) as error:
        run_in_process(train_prior.main, argv)
    assert tokenizer[1] in str(error.value) and configured in str(error.value)
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before writing anything


def test_train_prior_refuses_codes_whose_tokenizer_changed_unless_told(codes, tokenizer, tmp_path):
    """The same rule as sampling: refused, with a flag that says what it risks."""
    changed = Path(shutil.copytree(codes, tmp_path / "codes"))
    other = tmp_path / "other_tok"
    tok = ProVQTokenizer.from_pretrained(tokenizer[0])
    with torch.no_grad():
        tok.decoder.conv_out.bias.add_(0.5)  # the same config, other weights: another fingerprint
    tok.save_pretrained(other)
    record = changed / TOKENIZER_RECORD
    record.write_text(json.dumps({**json.loads(record.read_text()), "tokenizer": str(other)}))
    with pytest.raises(FingerprintMismatchError, match="--allow_tokenizer_mismatch") as error:
        run_in_process(train_prior.main, tiny_prior_argv(changed, tmp_path / "run", 2))
    assert tok.fingerprint() in str(error.value) and tokenizer[1] in str(error.value)
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before writing anything
    out = run_in_process(train_prior.main, [*tiny_prior_argv(changed, tmp_path / "run", 2, train__image_every=1),
                                            "--allow_tokenizer_mismatch"])
    assert (out / "model.safetensors").is_file() and not list((tmp_path / "run" / "images").glob("samples_*.png"))


# ---- sample.py ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def samples(tokenizer, prior, tmp_path_factory):
    """Two runs with the same seed."""
    runs = [tmp_path_factory.mktemp(f"samples{i}") for i in range(2)]
    for out in runs:
        run_in_process(sample.main, sample_argv(tokenizer[0], prior, out, "--seed", "3"))
    return runs


def test_sample_writes_pngs_grid_and_npz(samples):
    out = samples[0]
    pngs = sorted((out / "images").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(8)]
    assert (out / "grid.png").is_file()
    with np.load(out / "samples.npz") as npz:
        images, labels = npz["arr_0"], npz["labels"]
    assert images.dtype == np.uint8 and images.shape == (8, 16, 16, 3)  # NHWC, the ADM layout
    assert np.array_equal(images[5], np.asarray(Image.open(pngs[5]).convert("RGB")))
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # class-balanced, grouped by class


def test_sample_same_seed_gives_identical_npz(samples, tokenizer, prior, tmp_path):
    first, second = (np.load(out / "samples.npz") for out in samples)
    assert np.array_equal(first["arr_0"], second["arr_0"])
    assert np.array_equal(first["labels"], second["labels"])
    run_in_process(sample.main, sample_argv(tokenizer[0], prior, tmp_path, "--seed", "4"))
    assert not np.array_equal(np.load(tmp_path / "samples.npz")["arr_0"], first["arr_0"])


def test_sample_honours_labels(tokenizer, prior, tmp_path):
    run_in_process(sample.main, sample_argv(tokenizer[0], prior, tmp_path, "--labels", "0,1",
                                            "--num_images", "4"))
    assert np.load(tmp_path / "samples.npz")["labels"].tolist() == [0, 1, 0, 1]


@pytest.mark.parametrize("extra, message", [
    (["--labels", f"0,{CLASSES}"], rf"--labels \[{CLASSES}\] outside the prior's classes \[0, {CLASSES}\)"),
    (["--cfg_scale", "-0.5"], r"cfg_scale must be >= 0, got -0.5"),
    (["--top_p", "0"], r"top_p must be in \(0, 1\], got 0\.0"),
    (["--top_p", "1.5"], r"top_p must be in \(0, 1\], got 1.5"),
])
def test_sample_bad_settings_are_clear_errors(tokenizer, prior, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        run_in_process(sample.main, sample_argv(tokenizer[0], prior, tmp_path, *extra))
    assert not (tmp_path / "samples.npz").exists()


def test_sample_refuses_a_prior_of_another_tokenizer(tokenizer, prior, tmp_path):
    other, other_fingerprint = save_tiny_tokenizer(tmp_path / "other", seed=1)
    assert other_fingerprint != tokenizer[1]
    with pytest.raises(FingerprintMismatchError) as error:
        run_in_process(sample.main, sample_argv(other, prior, tmp_path / "out"))
    assert tokenizer[1] in str(error.value) and other_fingerprint in str(error.value)


# ---- train_prior.py -------------------------------------------------------------------------
def test_train_prior_validation_is_the_loss_and_accuracy_on_the_test_codes(codes, tmp_path):
    out = tmp_path / "run"
    export = run_in_process(train_prior.main, tiny_prior_argv(codes, out, 3, train__eval_every=3,
                                                              train__val_batches=0))
    rows = [r for r in logged_steps(out / "metrics.jsonl") if "val/loss" in r]
    assert [r["step"] for r in rows] == [3]
    # The export holds the weights that were validated (no EMA); evaluated here in one batch.
    prior = ARPrior.from_pretrained(export)
    test = CodeDataset(codes, "test")
    items = [test[i] for i in range(len(test))]
    grids = torch.stack([item["codes"] for item in items])
    labels = torch.tensor([item["label"] for item in items])
    with torch.no_grad():
        expected = prior(grids, labels)
    assert rows[0]["val/loss"] == pytest.approx(expected.loss.item(), rel=1e-5)
    assert rows[0]["val/accuracy"] == pytest.approx(expected.accuracy.item(), abs=1e-6)
    assert 0 <= rows[0]["val/accuracy"] < 1 and rows[0]["val/loss"] > 0


def test_unlabelled_images_from_tokenizer_to_samples(tmp_path, caplog):
    """A folder of images without class folders: tokenizer -> codes -> prior -> samples."""
    from provq.commands import train_tokenizer
    from provq.common.errors import ConfigError

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(48):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    tok = run_in_process(train_tokenizer.main, tiny_tokenizer_argv(folder, tmp_path / "tok", 3))
    run_in_process(extract_codes.main, extract_argv(tok, folder, tmp_path / "codes"))
    manifest = load_manifest(tmp_path / "codes", "train")
    assert manifest.num_classes == 0 and manifest.label_names == []
    assert set(CodeDataset(tmp_path / "codes", "train").labels.tolist()) == {-1}
    prior = run_in_process(train_prior.main, tiny_prior_argv(tmp_path / "codes", tmp_path / "prior", 3,
                                                             train__image_every=3, train__eval_every=3))
    assert ARPrior.from_pretrained(prior).config.num_classes == 0
    assert (tmp_path / "prior" / "images" / "samples_00000003.png").is_file()  # the grid while training
    caplog.set_level("WARNING")
    npz = run_in_process(sample.main, sample_argv(tok, prior, tmp_path / "samples"))  # no scale: 1 without classes
    assert "sampling without guidance" not in caplog.text
    with np.load(npz) as data:
        assert data["arr_0"].shape == (8, 16, 16, 3) and set(data["labels"].tolist()) == {-1}
        unguided = data["codes"]
    preset = tmp_path / "guided.yaml"  # a preset's scale (not a flag) falls back to 1, with a warning
    preset.write_text("sample:\n  cfg_scale: 2.0\n")
    npz = run_in_process(sample.main, sample_argv(tok, prior, tmp_path / "preset", "--config", str(preset)))
    assert "sampling without guidance" in caplog.text
    with np.load(npz) as data:
        assert np.array_equal(data["codes"], unguided)
    with pytest.raises(ConfigError, match="needs classes"):
        run_in_process(sample.main, sample_argv(tok, prior, tmp_path / "guided", "--cfg_scale", "2"))
    with pytest.raises(ConfigError, match="unlabelled"):
        run_in_process(sample.main, sample_argv(tok, prior, tmp_path / "labelled", "--labels", "0"))


def test_each_command_takes_only_the_flags_it_uses(tokenizer, prior, image_folder, tmp_path):
    from provq.common.errors import ConfigError

    for flag in ("--max_steps", "--seed", "--resume"):  # extraction resumes by itself, shard by shard
        with pytest.raises(ConfigError, match=f"unrecognized argument: {flag}"):
            run_in_process(extract_codes.main, extract_argv(tokenizer[0], image_folder, tmp_path / "c", flag, "1"))
    with pytest.raises(ConfigError, match="unrecognized argument: --max_steps"):
        run_in_process(sample.main, sample_argv(tokenizer[0], prior, tmp_path / "s", "--max_steps", "3"))
    with pytest.raises(ConfigError, match="the following arguments are required: --prior"):
        run_in_process(sample.main, ["--tokenizer", str(tokenizer[0]), "--output_dir", str(tmp_path / "s")])
    assert not (tmp_path / "c").exists() and not (tmp_path / "s").exists()


def test_sample_resume_keeps_finished_batches_and_gives_the_same_set(samples, tokenizer, prior, tmp_path):
    work = tmp_path / "samples"
    shutil.copytree(samples[0], work)
    (work / "samples.npz").unlink()
    for name in ("000004.png", "000005.png", "codes_000004.npy"):  # the second batch, killed half-way
        (work / "images" / name).unlink()
    kept = (work / "images" / "000000.png").stat().st_mtime_ns
    run_in_process(sample.main, sample_argv(tokenizer[0], prior, work, "--seed", "3", "--resume"))
    assert (work / "images" / "000000.png").stat().st_mtime_ns == kept
    first, resumed = (np.load(out / "samples.npz") for out in (samples[0], work))
    for key in ("arr_0", "labels", "codes"):
        assert np.array_equal(first[key], resumed[key]), key


def test_sample_config_section_and_flags_override_the_defaults(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("sample:\n  temperature: 0.5\n  top_k: 7\n")
    base = ["--tokenizer", "t", "--prior", "p", "--output_dir", str(tmp_path / "o")]
    assert sample.parse_args(base).sampling == sample.SamplingConfig(**sample.DEFAULTS)
    args = sample.parse_args([*base, "--config", str(preset), "--top_k", "3", "--sample.top_p", "0.9"])
    assert (args.sampling.cfg_scale, args.sampling.temperature, args.sampling.top_k, args.sampling.top_p) == (
        None, 0.5, 3, 0.9)  # the scale unset: decided by the prior (2.0 with classes, 1 without)
    assert sample.unguided_if_unlabelled(args, 4).cfg_scale == sampling.DEFAULT_CFG_SCALE == 2.0
    assert sample.unguided_if_unlabelled(args, 0).cfg_scale == 1.0
    flagged = sample.parse_args([*base, "--cfg_scale", "3"])
    assert flagged.sampling.cfg_scale == 3.0 and sample.unguided_if_unlabelled(flagged, 4).cfg_scale == 3.0


@pytest.mark.slow
@pytest.mark.parametrize("kind, fields, codes", [("fsq", {"levels": "[4,8]"}, 32), ("lfq", {"bits": 5}, 32)])
def test_each_lookup_free_family_from_tokenizer_to_evaluated_samples(kind, fields, codes, image_folder, tmp_path):
    """tokenizer -> codes -> prior -> samples -> rFID and gFID, for FSQ and LFQ (VQ: the demo's path)."""
    from eval.__main__ import main as eval_main
    from provq.commands import train_tokenizer

    family = {f"quantizer__{k}": v for k, v in fields.items()}
    tok = run_in_process(train_tokenizer.main, tiny_tokenizer_argv(
        image_folder, tmp_path / "tok", 3, quantizer__kind=kind, quantizer__codebook_size="null",
        quantizer__codebook_dim="null", quantizer__l2_normalize="false", quantizer__kmeans_init="false", **family))
    run_in_process(extract_codes.main, extract_argv(tok, image_folder, tmp_path / "codes"))
    assert load_manifest(tmp_path / "codes", "train").codebook_size == codes
    prior = run_in_process(train_prior.main, tiny_prior_argv(tmp_path / "codes", tmp_path / "prior", 2))
    assert ARPrior.from_pretrained(prior).config.codebook_size == codes  # the vocabulary is the family's
    npz = run_in_process(sample.main, sample_argv(tok, prior, tmp_path / "samples"))
    with np.load(npz) as data:
        assert data["codes"].max() < codes and data["arr_0"].shape == (8, 16, 16, 3)
    rfid = run_in_process(eval_main, ["rfid", "--tokenizer", str(tok), "--dataset", str(image_folder),
                                      "--lpips_net", "none"])
    gfid = run_in_process(eval_main, ["gfid", "--samples", str(npz), "--ref", str(image_folder)])
    # usage and perplexity, counted by hand from the test split's extracted codes (the same images)
    test_codes = torch.stack([item["codes"] for item in CodeDataset(tmp_path / "codes", "test")]).flatten()
    counts = torch.bincount(test_codes, minlength=codes).double()
    p = counts[counts > 0] / counts.sum()
    assert rfid["metrics"]["codebook_usage"] == (counts > 0).sum().item() / codes
    assert rfid["metrics"]["codebook_perplexity"] == pytest.approx(torch.exp(-(p * p.log()).sum()).item(), rel=1e-9)
    assert rfid["num_images"] == len(CodeDataset(tmp_path / "codes", "test")) and rfid["metrics"]["rfid"] > 0
    assert gfid["metrics"]["fid"] > 0 and gfid["num_images"]["samples"] == 8


def test_the_demo_trains_both_stages_at_the_precision_it_is_given():
    import argparse

    from provq.commands import demo

    def trained(precision):
        args = argparse.Namespace(output_dir="runs/demo", config="emoji32", num_samples=500, cfg_scale=None,
                                  mixed_precision=precision)
        found = {name: command.argv for name, command, _ in demo.stages(args)}
        return [found[stage][found[stage].index(f"--{stage}.train.mixed_precision") + 1]
                if f"--{stage}.train.mixed_precision" in found[stage] else None for stage in ("tokenizer", "prior")]

    assert trained("auto") == ["auto", "auto"]  # bf16 where the CPU computes it, fp32 elsewhere
    assert trained("no") == ["no", "no"]
    assert trained("preset") == [None, None]  # the config's own (emoji32: bf16)
