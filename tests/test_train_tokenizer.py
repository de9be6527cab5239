"""train_tokenizer.py end to end on a tiny image folder: a 20-step run, then a resumed run."""

from __future__ import annotations

import pytest
import torch
import yaml
from training_helpers import logged_steps, run_in_process, tiny_tokenizer_argv

from provq.commands import train_tokenizer
from provq.training import ConfigError
from tokenizer import ProVQTokenizer, QuantizerConfig, TokenizerConfig


@pytest.mark.slow
def test_twenty_steps_then_resume(image_folder, tmp_path, caplog):
    out = tmp_path / "run"
    # h = 0 for 4 steps, then a ramp to hard VQ by step 12: the k-means init runs mid-run.
    argv = tiny_tokenizer_argv(image_folder, out, 20, quantizer__schedule__warmup=4,
                               quantizer__schedule__transition=8, train__image_every=10,
                               train__eval_every=10, train__ema_decay=0.9)
    export = run_in_process(train_tokenizer.main, argv)

    tok = ProVQTokenizer.from_pretrained(export)
    assert bool(tok.quantizer.initialized)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    codes = tok.encode(images)
    assert codes.shape == (2, 8, 8) and codes.dtype == torch.long
    assert int(codes.max()) < 32
    assert tok.decode(codes).shape == images.shape

    rows = logged_steps(out / "metrics.jsonl")
    train_rows = [r for r in rows if "loss/total" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 21))
    for name in ("quantizer/hardness", "quantizer/usage", "quantizer/perplexity", "loss/reconstruction"):
        assert all(name in r for r in train_rows), name
    assert train_rows[0]["quantizer/hardness"] == 0.0 and train_rows[-1]["quantizer/hardness"] == 1.0
    evals = [r for r in rows if "eval/psnr" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert all(r["eval/psnr"] > 0 and 0 < r["eval/usage"] <= 1 for r in evals)
    # the geometry: effective dimensions within the codebook's 8 dimensions, a distance, ever used
    assert all(1 <= r["eval/dim_latents"] <= 8 and 0 < r["eval/dim_codes"] <= 8 for r in evals)
    assert all(0 <= r["eval/code_distance"] <= 2 for r in evals)  # unit vectors (l2 codes)
    assert 0 < train_rows[-1]["quantizer/ever_used"] <= 1
    assert (out / "images" / "recon_00000010.png").is_file()
    assert (out / "images" / "recon_00000020.png").is_file()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["tokenizer"]["model"]["quantizer"]["codebook_size"] == 32
    assert saved["tokenizer"]["train"]["mixed_precision"] == "no"  # not YAML 1.1's False
    assert saved["data"]["dataset"] == str(image_folder)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000015", "step_00000020"]

    # Resumed to a longer run: it continues from step 20, logs each step once, exports again.
    caplog.set_level("INFO")
    run_in_process(train_tokenizer.main, argv[:argv.index("--max_steps")] + ["--max_steps", "24"]
                   + argv[argv.index("--max_steps") + 2:] + ["--resume", "latest"])
    assert "resumed from" in caplog.text and "at step 20" in caplog.text
    steps = [r["step"] for r in logged_steps(out / "metrics.jsonl") if "loss/total" in r]
    assert steps == list(range(1, 25))
    assert ProVQTokenizer.from_pretrained(export).fingerprint() != tok.fingerprint()


@pytest.mark.parametrize("field, value, named", [
    ("--tokenizer.model.quantizer.codebok_size", "3", "tokenizer.model.quantizer.codebok_size"),
    ("--tokenizer.train.batch_size", "big", "tokenizer.train.batch_size"),
    ("--tokenizer.train.mixed_precision", "fp8", "tokenizer.train: mixed_precision"),
])
def test_bad_dotted_field_is_an_error_naming_it(image_folder, tmp_path, field, value, named):
    argv = tiny_tokenizer_argv(image_folder, tmp_path / "run", 2) + [field, value]
    with pytest.raises(ConfigError, match=named):
        run_in_process(train_tokenizer.main, argv)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_the_ema_takes_the_kmeans_codebook_when_the_init_replaces_it():
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    tok = ProVQTokenizer(TokenizerConfig(
        resolution=16, base_channels=8, channel_multipliers=[1, 2], latent_channels=8, norm_num_groups=4,
        quantizer=QuantizerConfig(codebook_size=16, codebook_dim=4, kmeans_buffer=256))).train()
    ema = EMAModel(tok.parameters(), decay=0.9)
    shadow = dict(zip([name for name, _ in tok.named_parameters()], ema.shadow_params, strict=True))
    random_codebook = tok.quantizer.codebook.weight.detach().clone()
    tok(torch.rand(4, 3, 16, 16) * 2 - 1, hardness=0.0)  # continuous: fills the k-means buffer
    assert tok(torch.rand(4, 3, 16, 16) * 2 - 1, hardness=0.5).quantizer.initialized_now
    assert not torch.equal(tok.quantizer.codebook.weight, random_codebook)
    assert torch.equal(shadow["quantizer.codebook.weight"], random_codebook)  # the EMA still averages it
    encoder_shadow = shadow["encoder.conv_in.weight"].clone()
    with torch.no_grad():
        tok.encoder.conv_in.weight.add_(1.0)  # an ordinary update: the EMA must keep averaging it
    train_tokenizer.sync_ema_codebook(ema, tok)
    assert torch.equal(shadow["quantizer.codebook.weight"], tok.quantizer.codebook.weight)
    assert torch.equal(shadow["encoder.conv_in.weight"], encoder_shadow)


@pytest.mark.slow
def test_training_and_eval_report_the_same_psnr(image_folder, tmp_path):
    """One PSNR protocol (uint8 pixels): the training log's last evaluation over the whole test split
    equals `python -m eval rfid --pixel_only` on the exported tokenizer and the same split."""
    from eval.__main__ import main as eval_main

    out = tmp_path / "run"
    export = run_in_process(train_tokenizer.main, tiny_tokenizer_argv(image_folder, out, 3, train__eval_batches=0))
    logged = [r for r in logged_steps(out / "metrics.jsonl") if "eval/psnr" in r][-1]
    result = run_in_process(eval_main, ["rfid", "--tokenizer", str(export), "--dataset", str(image_folder),
                                        "--split", "test", "--pixel_only", "--lpips_net", "none"])
    assert result["num_images"] > 0
    assert logged["eval/psnr"] == pytest.approx(result["metrics"]["psnr"], rel=1e-12)
    assert logged["eval/usage"] == pytest.approx(result["metrics"]["codebook_usage"], rel=1e-12)


@pytest.mark.parametrize("kind, fields", [("fsq", {"levels": "[4,8]"}), ("lfq", {"bits": 5})])
def test_each_family_trains_and_logs_the_same_statistics(image_folder, tmp_path, kind, fields):
    out = tmp_path / "run"
    extra = {f"quantizer__{k}": v for k, v in fields.items()}
    export = run_in_process(train_tokenizer.main, tiny_tokenizer_argv(
        image_folder, out, 4, quantizer__kind=kind, quantizer__codebook_size="null", quantizer__codebook_dim="null",
        quantizer__l2_normalize="false", quantizer__kmeans_init="false", quantizer__schedule__warmup=1,
        quantizer__schedule__transition=2, train__eval_every=4, **extra))
    tok = ProVQTokenizer.from_pretrained(export)
    assert tok.config.quantizer.kind == kind and tok.config.quantizer.codebook_size == 32
    rows = logged_steps(out / "metrics.jsonl")
    train_rows = [r for r in rows if "loss/total" in r]
    assert [r["quantizer/hardness"] for r in train_rows] == [0.0, 0.0, 0.5, 1.0]
    for name in ("quantizer/usage", "quantizer/perplexity", "quantizer/dead_codes", "quantizer/quant_error",
                 "loss/quantizer"):
        assert all(name in r for r in train_rows), name
    assert ("loss/entropy" in train_rows[-1]) == (kind == "lfq")
    evaluated = [r for r in rows if "eval/dim_codes" in r][-1]
    assert 0 < evaluated["eval/usage"] <= 1 and 1 <= evaluated["eval/dim_latents"] <= tok.quantizer.codebook_dim


def test_the_codebook_moments_can_be_reset_at_the_kmeans_init(image_folder, tmp_path):
    """With reset_codebook_moments, Adam restarts for the codebook at the init: after the run its
    step count is the steps since the init, while every other parameter's counts all the steps."""
    out = tmp_path / "run"
    argv = tiny_tokenizer_argv(image_folder, out, 6, quantizer__schedule__kind="step", quantizer__schedule__warmup=3,
                               train__reset_codebook_moments="true", train__save_every=6)
    run_in_process(train_tokenizer.main, argv)
    state = torch.load(out / "checkpoints" / "step_00000006" / "optimizer.bin", weights_only=False)["state"]
    steps = sorted({int(s["step"]) for s in state.values()})
    assert steps == [3, 6]  # the init ran at step 3 (0-based, the first hard one): 3 fresh steps since
    assert sum(int(s["step"]) == 3 for s in state.values()) == 1  # only the codebook restarted
    run_in_process(train_tokenizer.main, tiny_tokenizer_argv(image_folder, tmp_path / "kept", 6, train__save_every=6,
                                                             quantizer__schedule__kind="step",
                                                             quantizer__schedule__warmup=3))
    kept = torch.load(tmp_path / "kept" / "checkpoints" / "step_00000006" / "optimizer.bin", weights_only=False)
    assert {int(s["step"]) for s in kept["state"].values()} == {6}  # by default the moments are kept
