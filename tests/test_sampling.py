"""Tests of generator/sampling.py: KV cache, CFG, temperature, top-k/top-p, seeds, validation."""

import numpy as np
import pytest
import torch

from generator import ARPrior, PriorConfig, sample
from generator.sampling import SamplingConfig, filter_logits, guide, pick_tokens

TINY = dict(codebook_size=64, code_height=4, code_width=4, num_classes=3, hidden_size=32,
            num_layers=2, num_heads=2, intermediate_size=64)
LABELS = [0, 1, 2, 1]


@pytest.fixture(scope="module")
def prior():
    torch.manual_seed(0)
    model = ARPrior(PriorConfig(**TINY)).eval()
    # Sharper than the 0.02 init so that classes and positions really differ, as after training.
    with torch.no_grad():
        model.llama.lm_head.weight.mul_(50)
    return model


def reference_sample(prior, labels, temperature, seed):
    """Conditional sampling the slow, obvious way: a full teacher-forced pass per token."""
    labels = torch.tensor(labels)
    codes = torch.zeros(len(labels), prior.config.num_tokens, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    for t in range(prior.config.num_tokens):
        logits = prior(codes, labels).logits[:, t].float()  # causal: codes >= t are ignored
        codes[:, t] = pick_tokens(logits, SamplingConfig(temperature=temperature), generator)
    return codes.view(len(labels), prior.config.code_height, prior.config.code_width)


@pytest.mark.parametrize("settings", [
    dict(temperature=0.0),
    dict(temperature=1.0, seed=3),
    dict(temperature=1.0, seed=3, cfg_scale=2.5, top_k=20, top_p=0.9),
])
def test_kv_cache_gives_exactly_the_uncached_tokens(prior, settings):
    cached = sample(prior, LABELS, use_cache=True, **settings)
    assert cached.shape == (4, 4, 4) and cached.dtype == torch.long
    assert torch.equal(cached, sample(prior, LABELS, use_cache=False, **settings))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cfg_scale_one_equals_conditional_sampling(prior, temperature):
    expected = reference_sample(prior, LABELS, temperature, seed=5)
    assert torch.equal(sample(prior, LABELS, cfg_scale=1.0, temperature=temperature, seed=5),
                       expected)
    # The guided path (null rows in the same batch) at a scale of ~1 picks the same tokens.
    assert torch.equal(sample(prior, LABELS, cfg_scale=1.0 + 1e-6, temperature=0.0),
                       reference_sample(prior, LABELS, 0.0, seed=0))


def test_cfg_scale_zero_is_unconditional_and_large_scales_change_samples(prior):
    unconditional = reference_sample(prior, [-1] * 4, 0.0, seed=0)  # -1 -> null class token
    assert torch.equal(sample(prior, LABELS, cfg_scale=0.0, temperature=0.0), unconditional)
    assert not torch.equal(sample(prior, LABELS, cfg_scale=4.0, temperature=0.0),
                           sample(prior, LABELS, cfg_scale=1.0, temperature=0.0))


def test_guidance_formula():
    cond, uncond = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    torch.testing.assert_close(guide(torch.cat([cond, uncond]), 3.0), torch.tensor([[4.0, -2.0]]))


def test_same_seed_same_samples_different_seed_different(prior):
    a = sample(prior, LABELS, seed=1)
    assert torch.equal(a, sample(prior, LABELS, seed=1))
    assert not torch.equal(a, sample(prior, LABELS, seed=2))


def test_top_k_one_and_tiny_top_p_equal_greedy(prior):
    greedy = sample(prior, LABELS, temperature=0.0)
    assert torch.equal(sample(prior, LABELS, temperature=1.0, top_k=1, seed=4), greedy)
    assert torch.equal(sample(prior, LABELS, temperature=1.0, top_p=1e-6, seed=4), greedy)


def test_filters_keep_the_top_k_and_the_smallest_nucleus():
    logits = torch.tensor([[0.5, 0.3, 0.2, 0.0]]).log()
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.6)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=1.0)).sum() == 3


def test_draws_follow_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    logits = probs.log().expand(20000, 4)
    draws = pick_tokens(logits, SamplingConfig(), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)


def test_only_image_tokens_are_sampled():
    torch.manual_seed(0)
    model = ARPrior(PriorConfig(**TINY)).eval()
    head = model.llama.lm_head.weight
    with torch.no_grad():  # make class and null tokens by far the likeliest outputs of the head
        ids = torch.randint(0, head.shape[0], (8, 16))
        hidden = model.llama.model(input_ids=ids).last_hidden_state
        head[TINY["codebook_size"]:] = 100 * torch.nn.functional.normalize(hidden.mean((0, 1)), dim=0)
        full_logits = model.llama(input_ids=ids).logits
    assert (full_logits.argmax(-1) >= TINY["codebook_size"]).float().mean() > 0.5
    codes = sample(model, LABELS, temperature=2.0, cfg_scale=3.0)
    assert codes.min() >= 0 and codes.max() < TINY["codebook_size"]


def test_sampling_restores_training_mode(prior):
    prior.train()
    sample(prior, [0])
    assert prior.training
    prior.eval()


@pytest.mark.parametrize("kwargs, message", [
    (dict(labels=[3]), r"labels must be -1 \(no class\) or in \[0, 3\), got values in \[3, 3\]"),
    (dict(labels=[-2]), "labels must be -1"),
    (dict(labels=[]), "non-empty"),
    (dict(cfg_scale=-0.5), "cfg_scale"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-1), "top_k"),
])
def test_bad_sampling_inputs_raise(prior, kwargs, message):
    labels = kwargs.pop("labels", [0])
    with pytest.raises(ValueError, match=message):
        sample(prior, labels, **kwargs)


def test_label_minus_one_samples_the_null_class(prior):
    """-1 is "no class": the unconditional samples that guidance starts from."""
    unconditional = reference_sample(prior, [-1] * 4, 0.0, seed=0)
    assert torch.equal(sample(prior, [-1] * 4, temperature=0.0), unconditional)


def test_a_training_sample_grid_samples_the_compiled_layers_eagerly(tmp_path):
    """train.compile compiles the decoder layers for the training shapes; the grid's KV-cached decode must not
    compile them again (11 s with an empty inductor cache for a grid of 1.4 s on a CPU:
    bench/results/sample_grid.json). Under fail_on_recompile any compilation raises; the grid is the eager one,
    pixel for pixel."""
    from types import SimpleNamespace

    from PIL import Image
    from training_helpers import save_tiny_models

    from provq.commands.train_prior import write_samples
    from provq.data.pixels import save_image_grid
    from tokenizer import ProVQTokenizer

    models = save_tiny_models(tmp_path / "models")
    tok, prior = ProVQTokenizer.from_pretrained(models["tok"]), ARPrior.from_pretrained(models["prior"])
    labels = torch.arange(4).repeat_interleave(2)  # write_samples' rows: each class, 2 per class
    save_image_grid(tok.decode(sample(prior, labels, cfg_scale=2.0, seed=0)), tmp_path / "eager.png", nrow=2)
    for layer in prior.llama.model.layers:  # as train.compile does; dynamo's eager backend: no inductor to wait for
        layer.compile(backend="eager")
    prior.train()
    prior(torch.randint(16, (4, 8, 8)), torch.arange(4), generator=torch.Generator().manual_seed(0))
    accelerator = SimpleNamespace(unwrap_model=lambda model: model, is_main_process=True)
    with torch.compiler.set_stance("fail_on_recompile"):
        write_samples(prior, tok, accelerator, tmp_path / "grid.png", cfg_scale=2.0, per_class=2)
    assert prior.training  # sampling gave the training mode back
    with Image.open(tmp_path / "grid.png") as grid, Image.open(tmp_path / "eager.png") as eager:
        assert np.array_equal(np.asarray(grid), np.asarray(eager))
