"""Seed s means the same start in every variant of a study: the same initial weights of everything the
variants share, and the same batches in the same order, whatever the quantizer (issue 30)."""

from __future__ import annotations

import pytest
import torch
from training_helpers import run_in_process, tiny_tokenizer_argv

from provq.ablation.variants import VARIANTS, preset_ramp
from provq.commands import train_tokenizer
from provq.training import loop
from tokenizer.quantizer import ProgressiveQuantizer

# Each differs from hard VQ in something that draws random numbers or changes when the codebook is set:
# the ramp (k-means at its warm-up's end), SimVQ (a random basis, no k-means), the soft reading, a
# remedy with state (EMA + restarts), another code count.
BATCHES, TRAIN_STEP, FIT = loop.batches, train_tokenizer.train_step, ProgressiveQuantizer._maybe_kmeans_init
OTHERS = ("cosine+kmeans+l2", "cosine+l2+simvq", "cosine+soft+kmeans+l2", "vq+kmeans+l2+ema+restart")


def start_and_batches(tmp_path, image_folder, monkeypatch, name: str, codes: int = 32, steps: int = 6) -> dict:
    """The weights as the first optimizer step sees them and every batch's dataset indices."""
    seen = {"indices": [], "start": None, "fit": None}

    def recording_batches(*args, **kwargs):
        for batch in BATCHES(*args, **kwargs):
            seen["indices"].append(batch["index"].tolist())
            yield batch

    def recording_step(parts, batch, ctx):
        if seen["start"] is None:
            model = getattr(parts.model, "module", parts.model)
            seen["start"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        seen["step"] = ctx.step
        return TRAIN_STEP(parts, batch, ctx)

    def recording_fit(quantizer, z_e, fit):
        fitted = FIT(quantizer, z_e, fit)
        if fitted:  # the codebook as k-means left it, before any update
            seen["fit"] = (seen["step"], quantizer.codebook.weight.detach().clone())
        return fitted

    monkeypatch.setattr(loop, "batches", recording_batches)
    monkeypatch.setattr(train_tokenizer, "train_step", recording_step)
    monkeypatch.setattr(ProgressiveQuantizer, "_maybe_kmeans_init", recording_fit)
    variant = VARIANTS[name]
    argv = [*tiny_tokenizer_argv(image_folder, tmp_path / name, steps, train__seed=3),
            *variant.overrides(codes, preset_ramp("emoji32"))]
    run_in_process(train_tokenizer.main, argv)
    return seen


# The lookup-free families' pairs of study-1-fsq-lfq-fp32: hard codes against the ramp and the switch.
FAMILY_PAIRS = (("fsq", "cosine+fsq"), ("fsq", "step@mid+fsq"), ("lfq", "cosine+lfq"), ("lfq", "step@mid+lfq"))


@pytest.mark.parametrize("hard_name, other", [*(("vq+kmeans+l2", other) for other in OTHERS), *FAMILY_PAIRS])
def test_a_seed_is_the_same_start_and_the_same_batches_in_every_variant(hard_name, other, tmp_path, image_folder,
                                                                        monkeypatch):
    codes = 256 if hard_name == "fsq" else 32  # FSQ's smallest count with levels
    hard = start_and_batches(tmp_path, image_folder, monkeypatch, hard_name, codes)
    them = start_and_batches(tmp_path, image_folder, monkeypatch, other, codes)
    assert them["indices"] == hard["indices"] and len(hard["indices"]) == 6
    shared = [k for k in hard["start"] if not k.startswith("quantizer.")]
    assert shared and all(k in them["start"] for k in shared)
    differ = [k for k in shared if not torch.equal(hard["start"][k], them["start"][k])]
    assert differ == [], f"{other}: initial weights differ from {hard_name}'s in {differ[:4]}"


def test_another_code_count_keeps_the_encoder_and_decoder(tmp_path, image_folder, monkeypatch):
    small = start_and_batches(tmp_path, image_folder, monkeypatch, "vq+kmeans+l2", codes=32)
    large = start_and_batches(tmp_path, image_folder, monkeypatch, "vq+kmeans+l2", codes=128)
    shared = [k for k in small["start"] if not k.startswith("quantizer.")]
    assert all(torch.equal(small["start"][k], large["start"][k]) for k in shared)
    assert small["indices"] == large["indices"]


def test_a_matched_switch_fits_its_codebook_where_the_ramp_does(tmp_path, image_folder, monkeypatch):
    """The k-means confound removed: `+fit@start` fits the codebook at the ramp's start, on the same
    encoder state as the ramp (the same codebook), while the plain switch fits it at the switch."""
    runs = {name: start_and_batches(tmp_path, image_folder, monkeypatch, name, steps=20)
            for name in ("cosine+kmeans+l2", "step@end+kmeans+l2+fit@start", "step@end+kmeans+l2")}
    ramp, matched, late = (runs[n]["fit"] for n in runs)
    warmup, transition = preset_ramp("emoji32")
    # the ramp leaves h = 0 one step after its start; the switch is hard from its step on
    assert ramp[0] == matched[0] == round(warmup * 20) + 1 and late[0] == round((warmup + transition) * 20)
    assert torch.equal(ramp[1], matched[1]) and not torch.equal(ramp[1], late[1])
