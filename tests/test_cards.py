"""Model cards of exported tokenizers and priors, and push_to_hub up to the upload (offline)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from training_helpers import (
    REPO,
    logged_steps,
    run_in_process,
    tiny_prior_argv,
    tiny_tokenizer_argv,
)

from generator import ARPrior
from provq.commands import extract_codes, train_prior, train_tokenizer
from provq.common.cards import read_card
from tokenizer import ProVQTokenizer


@pytest.fixture(scope="module")
def exported(image_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("cards")
    tok = run_in_process(train_tokenizer.main, tiny_tokenizer_argv(image_folder, root / "tok", 3, train__eval_batches=0))
    run_in_process(extract_codes.main, [
        "--config", str(REPO / "configs" / "emoji32.yaml"), "--tokenizer", str(tok),
        "--output_dir", str(root / "codes"), "--data.dataset", str(image_folder), "--data.resolution", "16"])
    prior = run_in_process(train_prior.main, tiny_prior_argv(root / "codes", root / "prior", 2, train__eval_every=2))
    return {"tok": tok, "prior": prior, "root": root}


def test_the_exported_tokenizer_card_carries_the_runs_own_evaluation(exported, image_folder):
    card = ModelCard.load(exported["tok"] / "README.md")
    assert card.data.library_name == "provq" and card.data.license == "mit" and "vq" in card.data.tags
    assert card.data.datasets == [image_folder.name]
    last = [r for r in logged_steps(exported["root"] / "tok" / "metrics.jsonl") if "eval/psnr" in r][-1]
    results = {r.metric_type: r for r in card.data.eval_results}
    assert results["psnr"].metric_value == last["eval/psnr"]
    assert results["codebook_usage"].metric_value == last["eval/usage"]
    assert results["psnr"].metric_args["images"] == last["eval/images"] > 0
    assert results["psnr"].dataset_split == "test"
    assert "| psnr |" in card.text
    scope = {"images": torch.zeros(2, 3, 16, 16)}  # the card's own lines, run as a user pastes them
    exec(card_snippet(card.text).replace("<this folder or repo id>", str(exported["tok"])), scope)
    assert scope["codes"].shape == (2, 8, 8) and scope["images"].shape == (2, 3, 16, 16)
    loaded = ProVQTokenizer.from_pretrained(exported["tok"])
    assert loaded.card == read_card(exported["tok"])


@pytest.mark.slow
def test_eval_card_adds_the_reconstruction_metrics_and_replaces_them_when_measured_again(exported, image_folder,
                                                                                         tmp_path):
    import shutil

    from eval.__main__ import main as eval_main

    folder = tmp_path / "tok"
    shutil.copytree(exported["tok"], folder)
    argv = ["rfid", "--tokenizer", str(folder), "--dataset", str(image_folder), "--split", "test",
            "--lpips_net", "none", "--card"]
    for _ in range(2):
        result = run_in_process(eval_main, argv)
    metrics, _ = read_card(folder)
    by_name = {}
    for m in metrics:
        by_name.setdefault(m.name, []).append(m)
    assert len(by_name["rfid"]) == 1 and len(by_name["ssim"]) == 1  # measured twice, listed once
    assert by_name["rfid"][0].value == result["metrics"]["rfid"]
    assert by_name["rfid"][0].protocol["images"] == result["num_images"]
    assert by_name["rfid"][0].protocol["extractor checksum"] == result["protocol"]["checksum"][:16]
    # the training run's uint8 PSNR on the same split is the same protocol: replaced, not doubled
    assert len(by_name["psnr"]) == 1 and by_name["psnr"][0].value == pytest.approx(result["metrics"]["psnr"])


def test_the_prior_card_gives_bits_per_code_and_round_trips(exported):
    card = ModelCard.load(exported["prior"] / "README.md")
    last = [r for r in logged_steps(exported["root"] / "prior" / "metrics.jsonl") if "val/loss" in r][-1]
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["bits_per_code"] == pytest.approx(last["val/loss"] / math.log(2))
    prior = ARPrior.from_pretrained(exported["prior"])
    assert prior.config.tokenizer_fingerprint in card.text
    scope = {}
    exec(card_snippet(card.text).replace("<this folder or repo id>", str(exported["prior"]))
         .replace("<its tokenizer>", str(exported["tok"])), scope)
    assert scope["images"].shape == (2, 3, 16, 16) and scope["images"].abs().max() <= 1


def card_snippet(text: str) -> str:
    return text.split("```python\n", 1)[1].split("```", 1)[0]


def test_train_prior_stores_the_datasets_class_names_with_the_prior(exported):
    """The app and sample grids name classes without the dataset: train_prior.py keeps the codes' names."""
    prior = ARPrior.from_pretrained(exported["prior"])
    assert prior.config.label_names == ["class0", "class1", "class2", "class3"]
    assert "4 classes (class0, class1, class2, class3)" in (exported["prior"] / "README.md").read_text()


def test_push_to_hub_uploads_the_three_files_through_huggingface_hub(exported, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub

    calls = {}

    def create_repo(repo_id, **kwargs):
        calls["create"] = repo_id

    def upload_folder(repo_id, folder_path, **kwargs):
        calls["upload"] = (repo_id, sorted(p.name for p in Path(folder_path).iterdir()))
        shutil.copytree(folder_path, tmp_path / "uploaded")
        return "https://huggingface.co/user/tok/commit/abc"

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    tok = ProVQTokenizer.from_pretrained(exported["tok"])
    assert tok.push_to_hub("user/tok").endswith("/commit/abc")
    assert calls == {"create": "user/tok", "upload": ("user/tok", ["README.md", "config.json", "model.safetensors"])}
    uploaded = ProVQTokenizer.from_pretrained(tmp_path / "uploaded")
    assert uploaded.fingerprint() == tok.fingerprint()
    assert read_card(tmp_path / "uploaded") == read_card(exported["tok"])  # the card travels with the weights
