"""Soft assignment annealed to hard codes (mechanisms soft and gumbel; tiny, CPU).

The oracles: the soft-to-hard formula written out with torch.cdist and torch.softmax on whole
matrices, nearest codes by brute force, torch.autograd.gradcheck, and
torch.nn.functional.gumbel_softmax for the Gumbel samples.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from training_helpers import run_in_process, tiny_tokenizer_argv

from provq.commands import train_tokenizer
from provq.common.errors import ConfigError
from provq.common.typed_config import build_config
from tokenizer import ProVQTokenizer
from tokenizer.quantizer import ProgressiveQuantizer, QuantizerConfig
from tokenizer.schedule import SCHEDULE_KINDS, ScheduleConfig, hardness
from tokenizer.soft_assignment import annealed_temperature, codebook_mixture


def make_quantizer(dim=6, **overrides) -> ProgressiveQuantizer:
    torch.manual_seed(0)
    fields = dict(codebook_size=16, codebook_dim=None, l2_normalize=False, kmeans_init=False, mechanism="soft")
    fields.update(overrides)
    return ProgressiveQuantizer(dim, QuantizerConfig(**fields))


def spread_codes(quantizer: ProgressiveQuantizer) -> ProgressiveQuantizer:
    """Codes on the scale of the latents (the init's +-1/K codes are all about equally far)."""
    with torch.no_grad():
        quantizer.codebook.weight.copy_(torch.randn(quantizer.codebook.weight.shape,
                                                    generator=torch.Generator().manual_seed(1)))
    return quantizer


def oracle_mixture(rows: torch.Tensor, codes: torch.Tensor, tau: float) -> torch.Tensor:
    """sum_k softmax(-||z - c_k||^2 / tau)_k c_k on whole matrices, by plain autograd."""
    return torch.softmax(-torch.cdist(rows, codes).pow(2) / tau, dim=-1) @ codes


def rows_of(z: torch.Tensor) -> torch.Tensor:
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


# ---- the mixture and its gradients -----------------------------------------------------------------
@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 64, None])
def test_chunked_equals_the_whole_matrix_in_values_and_gradients(chunk_rows):
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(23, 4, dtype=torch.float64, generator=generator).requires_grad_(True)
    codes = torch.randn(9, 4, dtype=torch.float64, generator=generator).requires_grad_(True)
    upstream = torch.randn(23, 4, dtype=torch.float64, generator=generator)
    ours = codebook_mixture(rows, codes, 0.3, chunk_rows=chunk_rows)
    theirs = oracle_mixture(rows, codes, 0.3)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-12)
    ours_grads = torch.autograd.grad(ours, (rows, codes), upstream)
    theirs_grads = torch.autograd.grad(theirs, (rows, codes), upstream)
    for mine, reference in zip(ours_grads, theirs_grads, strict=True):
        assert torch.allclose(mine, reference, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk_rows", [2, None])  # chunks recomputed in backward; one chunk kept
@pytest.mark.parametrize("gumbel", [False, True])
def test_backward_is_the_derivative_of_forward(gumbel, chunk_rows):
    generator = torch.Generator().manual_seed(2)
    rows = torch.randn(7, 3, dtype=torch.float64, generator=generator).requires_grad_(True)
    codes = torch.randn(5, 3, dtype=torch.float64, generator=generator).requires_grad_(True)

    def mixture(r, c):  # the same noise on every call: a fresh generator with one seed
        return codebook_mixture(r, c, 0.7, torch.Generator().manual_seed(1) if gumbel else None,
                                chunk_rows=chunk_rows)

    assert torch.autograd.gradcheck(mixture, (rows, codes))


def test_tiny_temperature_is_the_nearest_code():
    generator = torch.Generator().manual_seed(3)
    rows, codes = torch.randn(200, 8, generator=generator), torch.randn(32, 8, generator=generator)
    nearest = torch.cdist(rows, codes).argmin(dim=1)  # brute force
    assert torch.equal(codebook_mixture(rows, codes, 1e-7, chunk_rows=50), codes[nearest])


def test_huge_temperature_is_the_codebook_mean():
    quantizer = make_quantizer(soft_temperature_start=1e9)
    out = quantizer(torch.randn(2, 6, 3, 3), hardness=0.0)
    mean = quantizer.codebook.weight.detach().mean(0)
    assert torch.allclose(rows_of(out.z_out), mean.expand(18, 6), rtol=0, atol=1e-7)


def test_every_code_gets_gradient_from_every_latent():
    quantizer = make_quantizer(codebook_dim=4, l2_normalize=True)  # projections and l2 codes
    z = torch.randn(1, 5, 6)
    for position in range(5):
        quantizer.zero_grad()
        quantizer(z, hardness=0.3).z_out[0, position].sum().backward()
        reached = quantizer.codebook.weight.grad.abs().sum(1)
        assert (reached > 0).all(), f"latent {position} reaches {int((reached > 0).sum())} of 16 codes"
    interpolating = make_quantizer(mechanism="interpolate")
    interpolating(z.requires_grad_(True), hardness=0.3).z_out.sum().backward()
    assert interpolating.codebook.weight.grad is None  # the contrast: no code learns from the decoder


# ---- the quantizer's mechanism: h = 0, 0 < h < 1, h = 1 ----------------------------------------------
def test_temperature_is_log_linear_in_hardness():
    assert annealed_temperature(0.0, 2.0, 2e-3) == pytest.approx(2.0)
    assert annealed_temperature(0.5, 2.0, 2e-3) == pytest.approx(math.sqrt(2.0 * 2e-3))
    assert annealed_temperature(0.75, 1.0, 1e-4) == pytest.approx(1e-3)
    assert annealed_temperature(1.0, 2.0, 2e-3) == pytest.approx(2e-3)


@pytest.mark.parametrize("h", [0.0, 0.5, 0.9])
def test_decoder_sees_the_mixture_at_tau_of_h_from_h_zero(h):
    start, end = 0.5, 1e-3
    quantizer = spread_codes(make_quantizer(soft_temperature_start=start, soft_temperature_end=end))
    z = torch.randn(2, 6, 3, 3)
    out = quantizer(z, hardness=h)
    tau = start ** (1 - h) * end**h
    expected = oracle_mixture(rows_of(z), quantizer.codebook.weight.detach(), tau)
    assert torch.allclose(rows_of(out.z_out), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(out.z_out, z) and not torch.allclose(out.z_out, out.z_q)


@pytest.mark.parametrize("mechanism", ["soft", "gumbel"])
def test_hardness_one_is_bit_exact_hard_vq(mechanism):
    results = []
    for name in ("interpolate", mechanism):
        quantizer = make_quantizer(mechanism=name, codebook_dim=4, l2_normalize=True)
        z = torch.randn(2, 6, 3, 3, generator=torch.Generator().manual_seed(4), requires_grad=True)
        out = quantizer(z, hardness=1.0)
        (out.z_out.square().sum() + out.loss).backward()
        results.append((out.z_out, out.indices, out.loss, z.grad, quantizer.codebook.weight.grad))
    for hard, soft in zip(*results, strict=True):
        assert torch.equal(hard, soft)


def test_tiny_temperature_gives_the_hard_outputs_and_indices_below_h_one():
    quantizer = spread_codes(make_quantizer(soft_temperature_start=1e-7, soft_temperature_end=1e-7))
    z = torch.randn(2, 6, 4, 4)
    hard = quantizer(z, hardness=1.0)
    for h in (0.0, 0.5):
        out = quantizer(z, hardness=h)
        assert torch.equal(out.z_out, hard.z_out) and torch.equal(out.indices, hard.indices)
        nearest = torch.cdist(rows_of(z), quantizer.codebook.weight.detach()).argmin(1)
        assert torch.equal(out.indices.flatten(), nearest)


@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
def test_composes_with_every_schedule(kind):
    schedule = ScheduleConfig(kind=kind, warmup=2, transition=4)
    quantizer = spread_codes(make_quantizer(schedule=schedule))
    z = torch.randn(1, 6, 2, 2)
    hard = quantizer(z, hardness=1.0).z_out
    for step in range(8):
        h = hardness(step, schedule)
        out = quantizer(z, hardness=h).z_out
        if h == 1.0:
            assert torch.equal(out, hard)
        else:
            tau = annealed_temperature(h, 1.0, 1e-3)
            assert torch.allclose(rows_of(out), oracle_mixture(rows_of(z), quantizer.codebook.weight, tau),
                                  atol=1e-5)


def test_l2_codes_mix_inside_the_ball_and_the_kmeans_init_still_runs():
    quantizer = make_quantizer(codebook_dim=4, l2_normalize=True, kmeans_init=True, kmeans_buffer=64).train()
    z = torch.randn(2, 6, 4, 4)
    before = quantizer(z, hardness=0.0)
    assert not before.initialized_now and len(quantizer.kmeans_buffer) == 32
    codes = F.normalize(quantizer.codebook.weight.detach(), dim=-1)
    assert torch.allclose(rows_of(before.z_out), quantizer.proj_out(oracle_mixture(rows_of(before.z_e), codes, 1.0)),
                          atol=1e-5)
    mixed_norms = codebook_mixture(rows_of(before.z_e), codes, 1.0).norm(dim=1)
    assert (mixed_norms < 1).all() and (mixed_norms > 0).all()  # a mixture of unit codes: inside the ball
    after = quantizer(z, hardness=0.2)
    assert after.initialized_now
    new_codes = F.normalize(quantizer.codebook.weight.detach(), dim=-1)
    tau = annealed_temperature(0.2, 1.0, 1e-3)
    assert torch.allclose(rows_of(after.z_out), quantizer.proj_out(oracle_mixture(rows_of(after.z_e), new_codes, tau)),
                          atol=1e-5)


# ---- gumbel ------------------------------------------------------------------------------------------
def test_gumbel_samples_match_torch_gumbel_softmax():
    logits = torch.tensor([1.0, 0.2, -0.5, 0.7, -2.0])
    n, tau = 20000, 0.5
    # Unit-vector codes: the mixture is the weights themselves, and -||z - e_k||^2 / tau equals
    # logits_k up to a constant when z = logits * tau / 2.
    rows = (logits * tau / 2).expand(n, 5).contiguous()
    weights = codebook_mixture(rows, torch.eye(5), tau, torch.Generator().manual_seed(0), chunk_rows=777)
    torch.manual_seed(0)
    theirs_hard = F.gumbel_softmax(logits.expand(n, 5), tau=1.0, hard=True)
    theirs_soft = F.gumbel_softmax(logits.expand(n, 5), tau=1.0)
    expected = n * torch.softmax(logits, 0)
    for samples in (weights.argmax(1), theirs_hard.argmax(1)):
        counts = torch.bincount(samples, minlength=5).double()
        assert stats.chisquare(counts.numpy(), expected.double().numpy()).pvalue > 1e-3
    # the relaxed weights too: the same distribution, so the same mean within sampling error
    spread = (weights.std(0) ** 2 / n + theirs_soft.std(0) ** 2 / n).sqrt()
    assert ((weights.mean(0) - theirs_soft.mean(0)).abs() < 4 * spread).all()


def test_gumbel_noise_comes_from_the_generator_only():
    quantizer = spread_codes(make_quantizer(mechanism="gumbel", soft_temperature_start=0.3))
    z = torch.randn(2, 6, 4, 4)
    runs = [quantizer(z, 0.4, torch.Generator().manual_seed(s)).z_out for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    soft = make_quantizer(soft_temperature_start=0.3)
    assert not torch.allclose(runs[0], spread_codes(soft)(z, 0.4).z_out)  # noise, not the plain softmax
    with pytest.raises(ValueError, match="Generator"):
        quantizer(z, 0.0)


# ---- configuration -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, message", [
    ({"kind": "fsq", "levels": [8, 5], "mechanism": "soft"}, r"mechanism 'soft' .* kind vq only, not fsq"),
    ({"kind": "lfq", "bits": 4, "mechanism": "gumbel"}, r"mechanism 'gumbel' .* kind vq only, not lfq"),
    ({"soft_temperature_end": 0.0}, r"soft_temperature_end must be > 0"),
    ({"soft_temperature_start": -1.0}, r"soft_temperature_start must be > 0"),
])
def test_bad_soft_settings_are_one_clear_error(fields, message):
    with pytest.raises(ConfigError, match=message):
        build_config(QuantizerConfig, fields, prefix="tokenizer.model.quantizer.")


@pytest.mark.slow
def test_a_gumbel_run_resumes_bit_identically(image_folder, tmp_path):
    fields = dict(quantizer__mechanism="gumbel", quantizer__schedule__warmup=2,
                  quantizer__schedule__transition=6, train__save_every=4)
    argv = tiny_tokenizer_argv(image_folder, tmp_path / "run", 8, **fields)
    whole = ProVQTokenizer.from_pretrained(run_in_process(train_tokenizer.main, argv)).fingerprint()
    # Back to the checkpoint of step 4 (mid-ramp), then on to step 8 again.
    shutil.rmtree(tmp_path / "run" / "tokenizer")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000008")
    resumed = run_in_process(train_tokenizer.main, argv + ["--resume", "latest"])
    assert ProVQTokenizer.from_pretrained(resumed).fingerprint() == whole
