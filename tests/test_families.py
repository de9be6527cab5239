"""The quantizer families under the hardness curriculum: FSQ and LFQ beside VQ (tiny, CPU).

vector-quantize-pytorch's FSQ and LFQ are the oracle: at h = 1 ours gives their indices,
quantized outputs and (LFQ) entropy terms on the same inputs.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from vector_quantize_pytorch import FSQ, LFQ

from provq.common.errors import ConfigError
from provq.common.typed_config import build_config
from tokenizer import ProVQTokenizer, TokenizerConfig, families
from tokenizer.families import BinaryCodes, FiniteScalarCodes, lfq_entropy_terms
from tokenizer.quantizer import STAT_NAMES, ProgressiveQuantizer, QuantizerConfig

FAMILIES = {"vq": {}, "fsq": {"levels": [8, 5, 5, 5]}, "lfq": {"bits": 6}}


def family_quantizer(kind: str, latent_dim: int = 6, **fields) -> ProgressiveQuantizer:
    torch.manual_seed(0)
    base = {"codebook_size": 16, "kmeans_init": False} if kind == "vq" else {}
    return ProgressiveQuantizer(latent_dim, QuantizerConfig(kind=kind, **base, **FAMILIES[kind], **fields))


def identity_projections(quantizer: ProgressiveQuantizer) -> ProgressiveQuantizer:
    """Our projections as the identity, so the family itself is compared with the oracle's."""
    with torch.no_grad():
        for linear in (quantizer.proj_in, quantizer.proj_out):
            linear.weight.copy_(torch.eye(linear.weight.shape[0]))
            linear.bias.zero_()
    return quantizer


# ---- the curriculum's endpoints, for every family and mechanism ----------------------------------
@pytest.mark.parametrize("mechanism", ["interpolate", "stochastic"])
@pytest.mark.parametrize("kind", list(FAMILIES))
def test_h0_is_the_continuous_latent_and_h1_the_family_code(kind, mechanism):
    quantizer = family_quantizer(kind, mechanism=mechanism)
    z = torch.randn(2, 6, 4, 4)
    soft = quantizer(z, hardness=0.0)
    assert torch.equal(soft.z_out, quantizer.proj_out(soft.z_e.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    hard = quantizer(z, hardness=1.0)
    assert torch.equal(hard.z_out, quantizer.decode_indices(hard.indices))  # exactly the hard code
    assert not torch.equal(hard.z_q, hard.z_e)
    mid = quantizer(z, hardness=0.5, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(mid.z_out, soft.z_out) and not torch.equal(mid.z_out, hard.z_out)
    assert set(hard.stats) - set(STAT_NAMES) == ({"batch_entropy_exact"} if kind == "lfq" else set())
    assert set(STAT_NAMES) <= set(hard.stats)


@pytest.mark.parametrize("kind", ["fsq", "lfq"])
def test_interpolation_is_the_convex_mix(kind):
    quantizer = family_quantizer(kind)
    out = quantizer(torch.randn(3, 5, 6), hardness=0.3)
    assert torch.allclose(out.z_out, quantizer.proj_out(0.7 * out.z_e + 0.3 * out.z_q), atol=1e-6)


def test_straight_through_gradient_is_the_latents_jacobian():
    for kind in ("fsq", "lfq"):
        quantizer = family_quantizer(kind, latent_dim=FAMILIES[kind].get("bits") or 4)
        quantizer = identity_projections(quantizer)
        rows = torch.randn(2, 3, quantizer.codebook_dim, requires_grad=True)
        quantizer(rows, hardness=1.0).z_out.sum().backward()
        reference = rows.detach().clone().requires_grad_(True)
        quantizer.family.latent(reference).sum().backward()
        assert torch.allclose(rows.grad, reference.grad, atol=1e-6), kind


# ---- the oracle: vector-quantize-pytorch ----------------------------------------------------------
@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [8, 8, 8, 6, 5], [3, 4, 7]])
def test_fsq_matches_vector_quantize_pytorch(levels):
    ours = identity_projections(ProgressiveQuantizer(len(levels), QuantizerConfig(kind="fsq", levels=levels)))
    theirs = FSQ(levels=levels)
    z = torch.randn(4, len(levels), 6, 5) * 3
    out = ours(z, hardness=1.0)
    quantized, indices = theirs(z)
    assert torch.equal(out.indices, indices.long())
    assert torch.allclose(out.z_out, quantized, atol=1e-6)
    assert ours.config.codebook_size == math.prod(levels) == theirs.codebook_size
    codes = torch.arange(math.prod(levels))
    assert torch.allclose(ours.family.vectors(codes), theirs.indices_to_codes(codes), atol=1e-6)


@pytest.mark.parametrize("bits", [4, 10])
def test_lfq_matches_vector_quantize_pytorch(bits):
    ours = identity_projections(ProgressiveQuantizer(bits, QuantizerConfig(kind="lfq", bits=bits))).train()
    theirs = LFQ(dim=bits, entropy_loss_weight=1.0, diversity_gamma=1.0).train()
    z = torch.randn(2, bits, 4, 4, generator=torch.Generator().manual_seed(bits)) * 0.003  # soft assignments well inside float range at tau = 0.01
    out = ours(z, hardness=1.0)
    (quantized, indices, aux), breakdown = theirs(z, return_loss_breakdown=True)
    assert torch.equal(out.indices, indices.long())
    assert torch.equal(out.z_out, quantized)
    # their entropies clamp probabilities at 1e-5 and sum over all 2^bits codes; ours factorize
    assert out.entropy_loss.item() == pytest.approx(aux.item(), abs=5e-4)
    per_sample, batch, exact = lfq_entropy_terms(out.z_e.movedim(1, -1), 100.0, group_bits=bits)
    assert exact
    assert per_sample.item() == pytest.approx(breakdown.per_sample_entropy.item(), abs=5e-4)
    assert batch.item() == pytest.approx(breakdown.batch_entropy.item(), abs=5e-4)
    codes = torch.arange(2**bits)
    assert torch.equal(ours.family.vectors(codes), theirs.indices_to_codes(codes))


def _brute_force_entropies(z: torch.Tensor, inverse_temperature: float) -> tuple[float, float]:
    """The soft assignment over every code, by its definition: (mean per-sample, batch) entropies."""
    codes = BinaryCodes(z.shape[-1]).all_vectors()
    probs = torch.softmax(-torch.cdist(z.double(), codes.double()).pow(2) * inverse_temperature, dim=-1)
    average = probs.mean(0)
    return (-(probs * probs.log()).sum(-1).mean().item(), -(average * average.log()).sum().item())


def test_lfq_batch_entropy_is_exact_across_groups_when_it_fits():
    # Bits 3-5 repeat bits 0-2: redundancy across groups of 3 that a per-group sum cannot see.
    half = torch.randn(64, 3, generator=torch.Generator().manual_seed(0)) * 0.1  # nearly hard assignments
    z = torch.cat([half, half], dim=1)
    per_sample, batch = _brute_force_entropies(z, 100.0)
    terms = lfq_entropy_terms(z, 100.0, group_bits=3)  # 64 rows x 64 codes: well within the bound
    assert terms.exact
    assert terms.per_sample.item() == pytest.approx(per_sample, rel=1e-4)
    assert terms.batch.item() == pytest.approx(batch, rel=1e-4)
    # the copy adds almost no information; a sum over the two groups of 3 bits would count it twice
    assert 2 * _brute_force_entropies(half, 100.0)[1] - terms.batch.item() > 1.5


def test_lfq_grouped_approximation_beyond_the_bound_is_the_sum_over_groups(monkeypatch):
    z = torch.randn(64, 6, generator=torch.Generator().manual_seed(1)) * 0.01
    monkeypatch.setattr(families, "LFQ_EXACT_ENTROPY_VALUES", 64 * 2**6 - 1)  # one value short of exact
    grouped = lfq_entropy_terms(z, 100.0, group_bits=3)
    assert not grouped.exact
    by_group = [_brute_force_entropies(part, 100.0) for part in z.split(3, dim=1)]
    assert grouped.batch.item() == pytest.approx(sum(b for _, b in by_group), rel=1e-4)
    assert grouped.batch.item() >= _brute_force_entropies(z, 100.0)[1] - 1e-5  # subadditivity: from above
    assert grouped.per_sample.item() == pytest.approx(_brute_force_entropies(z, 100.0)[0], rel=1e-4)


def test_entropy_group_bits_beyond_any_workable_group_is_a_clear_error(monkeypatch):
    with pytest.raises(ConfigError, match=r"entropy_group_bits must be in \[1, 20\], got 64"):
        build_config(QuantizerConfig, {"kind": "lfq", "bits": 10, "entropy_group_bits": 64},
                     prefix="tokenizer.model.quantizer.")
    monkeypatch.setattr(families, "LFQ_EXACT_ENTROPY_VALUES", 1000)  # neither 2^6 nor 2^4 x 64 rows fits
    allocated = []
    monkeypatch.setattr(families, "_group_joint_probs", lambda *a: allocated.append(a))
    with pytest.raises(ConfigError, match=r"entropy_group_bits 4: .* 64 rows x 2\^4 = 1,024 values .* 1,000"):
        lfq_entropy_terms(torch.randn(64, 6), 100.0, group_bits=4)
    assert not allocated  # refused before the soft assignment is built


def test_lfq_logs_which_batch_entropy_it_used(monkeypatch):
    quantizer = family_quantizer("lfq", entropy_group_bits=3).train()
    z = torch.randn(2, 6, 4, 4)
    assert quantizer(z, hardness=1.0).stats["batch_entropy_exact"].item() == 1.0
    monkeypatch.setattr(families, "LFQ_EXACT_ENTROPY_VALUES", 32 * 2**5)
    assert quantizer(z, hardness=1.0).stats["batch_entropy_exact"].item() == 0.0
    assert "batch_entropy_exact" not in family_quantizer("fsq").train()(z, hardness=1.0).stats


def test_the_lfq_card_says_when_the_batch_entropy_is_exact():
    def card(bits, group_bits=10):
        config = TokenizerConfig(resolution=16, base_channels=8, channel_multipliers=[1, 2], latent_channels=8,
                                 norm_num_groups=4, quantizer=QuantizerConfig(kind="lfq", bits=bits,
                                                                              entropy_group_bits=group_bits))
        return "\n".join(ProVQTokenizer.card_content(config).summary)

    # 8x8 codes per image: 2^24 / (64 x 2^10) = 256 images
    assert "exact over all 1,024 codes for micro-batches of up to 256 images per process" in card(10)
    assert "else summed over groups of 7 bits (an approximation from above)" in card(10, 7)
    assert "always summed over groups of 10 bits" in card(20)  # 64 x 2^20 > 2^24: not one image


# ---- codes as integers# ---- codes as integers ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", [FiniteScalarCodes([8, 5, 5, 5]), FiniteScalarCodes([3, 4]), BinaryCodes(5)])
def test_every_code_is_one_integer_and_back(family):
    vectors = family.all_vectors()
    assert vectors.shape == (family.num_codes, family.dim)
    assert len({tuple(v.tolist()) for v in vectors}) == family.num_codes  # all distinct
    z_q, indices = family.quantize(vectors)
    assert torch.equal(indices, torch.arange(family.num_codes)) and torch.equal(z_q, vectors)


def test_fsq_code_values_and_mixed_radix_order():
    family = FiniteScalarCodes([8, 5])
    values = sorted({round(v, 6) for v in family.all_vectors()[:, 0].tolist()})
    assert values == [-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75]  # even L: -1 .. 1 - 2/L
    assert sorted({round(v, 6) for v in family.all_vectors()[:, 1].tolist()}) == [-1.0, -0.5, 0.0, 0.5, 1.0]
    # the first channel is the least significant digit
    assert torch.equal(family.vectors(torch.tensor([1]))[0], torch.tensor([-0.75, -1.0]))
    assert torch.equal(family.vectors(torch.tensor([8]))[0], torch.tensor([-1.0, -0.5]))
    bounded = family.latent(torch.randn(1000, 2) * 10)
    assert bounded[:, 0].min() > -1.0 - 1e-3 and bounded[:, 0].max() < 0.75 + 0.25 / 2


@pytest.mark.parametrize("levels", [[2], [8, 2, 5]])
def test_fsq_refuses_a_level_of_two_as_vector_quantize_pytorch_does(levels):
    # The paper's bound puts a 2-level channel's split 3.8 tanh-units off centre (atanh(0.999)): all but
    # ~3e-5 of standard normal inputs fall on one value, a degenerate channel. The oracle refuses it too.
    with pytest.raises(AssertionError, match="levels == 2"):
        FSQ(levels=levels)
    with pytest.raises(ConfigError, match=r"levels.*2 is a degenerate channel"):
        build_config(QuantizerConfig, {"kind": "fsq", "levels": levels}, prefix="tokenizer.model.quantizer.")
    with pytest.raises(ValueError, match="degenerate"):
        FiniteScalarCodes(levels)


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_decode_refuses_a_code_outside_the_code_count(kind):
    quantizer = family_quantizer(kind)
    count = quantizer.config.codebook_size
    assert quantizer.decode_indices(torch.tensor([[0, count - 1]])).shape == (1, 2, 6)
    for bad in (count, -1):  # FSQ's and LFQ's digit arithmetic would wrap these onto real codes
        with pytest.raises(IndexError, match=rf"code {bad} is outside \[0, {count}\)"):
            quantizer.decode_indices(torch.tensor([[0, bad]]))


def test_lfq_index_bits_are_most_significant_first():
    family = BinaryCodes(3)
    assert family.vectors(torch.tensor([1, 4])).tolist() == [[-1, -1, 1], [1, -1, -1]]


# ---- losses and statistics mean the same for every family ---------------------------------------
def test_fsq_has_no_auxiliary_loss_and_lfq_weights_its_terms_by_omega():
    z = torch.randn(2, 6, 3, 3)
    fsq = family_quantizer("fsq").train()(z, hardness=0.5)
    assert fsq.loss.item() == 0.0 and fsq.codebook_loss.item() == 0.0
    quantizer = family_quantizer("lfq", beta=0.25, entropy_weight=0.1, omega_floor=0.2).train()
    out = quantizer(z, hardness=0.5)
    omega = 0.2 + 0.8 * 0.5
    expected = omega * (0.25 * out.commitment_loss + 0.1 * out.entropy_loss)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.commitment_loss.item() == pytest.approx(((out.z_e - out.z_q) ** 2).mean().item(), rel=1e-6)
    assert out.codebook_loss.item() == 0.0
    assert quantizer.eval()(z, hardness=0.5).entropy_loss.item() == 0.0  # training only


@pytest.mark.parametrize("kind", ["fsq", "lfq"])
def test_statistics_count_the_family_codes(kind):
    quantizer = family_quantizer(kind).train()
    out = quantizer(torch.randn(4, 6, 8, 8), hardness=1.0)
    counts = torch.bincount(out.indices.flatten(), minlength=quantizer.config.codebook_size)
    assert out.stats["usage"].item() == pytest.approx((counts > 0).float().mean().item())
    assert out.stats["ever_used"].item() == pytest.approx((counts > 0).float().mean().item())
    assert out.stats["quant_error"].item() == pytest.approx(
        ((out.z_e - out.z_q) ** 2).sum(1).mean().item(), rel=1e-5)
    assert quantizer.codebook_vectors().shape == (quantizer.config.codebook_size, quantizer.codebook_dim)


# ---- configs --------------------------------------------------------------------------------------
def test_configs_resolve_the_family_defaults():
    vq = QuantizerConfig()
    assert (vq.kind, vq.codebook_size, vq.codebook_dim, vq.l2_normalize, vq.kmeans_init) == ("vq", 1024, 8, True, True)
    fsq = QuantizerConfig(kind="fsq", levels=[8, 5, 5, 5])
    assert (fsq.codebook_size, fsq.codebook_dim, fsq.l2_normalize, fsq.kmeans_init) == (1000, 4, False, False)
    lfq = QuantizerConfig(kind="lfq", bits=10)
    assert (lfq.codebook_size, lfq.codebook_dim) == (1024, 10)
    assert TokenizerConfig().quantizer == QuantizerConfig()  # one home for the defaults


@pytest.mark.parametrize("fields, message", [
    ({"kind": "fsq", "levels": [8, 1, 5]}, r"levels must list at least one level count >= 3"),
    ({"kind": "fsq"}, r"levels must list"),
    ({"kind": "lfq", "bits": 21}, r"bits must be in \[1, 20\], got 21"),
    ({"kind": "fsq", "levels": [8, 5], "kmeans_init": True}, r"kmeans_init applies to kind vq only"),
    ({"kind": "lfq", "bits": 4, "l2_normalize": True}, r"l2_normalize applies to kind vq only"),
    ({"kind": "fsq", "levels": [8, 5], "codebook_size": 1024}, r"codebook_size 1024 differs from the 40 codes"),
    ({"kind": "lfq", "bits": 4, "levels": [3]}, r"levels does not apply to kind 'lfq'"),
    ({"kind": "vq", "bits": 4}, r"bits does not apply to kind 'vq'"),
    ({"kind": "rvq"}, r"kind must be one of"),
    ({"kind": "fsq", "levels": [8, 5, 5, 5], "codebook_dim": 8}, r"codebook_dim applies to kind vq only"),
    ({"kind": "lfq", "bits": 10, "codebook_dim": 16}, r"codebook_dim applies to kind vq only"),
    ({"codebook_dim": -1}, r"codebook_dim must be >= 0"),
])
def test_bad_family_parameters_are_one_clear_error(fields, message):
    with pytest.raises(ConfigError, match=message):
        build_config(QuantizerConfig, fields, prefix="tokenizer.model.quantizer.")


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_tokenizer_round_trips_each_family(kind, tmp_path):
    base = {"codebook_size": 32, "codebook_dim": 4, "kmeans_init": False} if kind == "vq" else {}
    config = TokenizerConfig(resolution=16, base_channels=8, channel_multipliers=[1, 2], latent_channels=8,
                             norm_num_groups=4, quantizer=QuantizerConfig(kind=kind, **base, **FAMILIES[kind]))
    torch.manual_seed(0)
    tok = ProVQTokenizer(config).eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    codes = tok.encode(images)
    assert codes.shape == (2, 8, 8) and 0 <= codes.min() and codes.max() < config.quantizer.codebook_size
    loaded = ProVQTokenizer.from_pretrained(tok.save_pretrained(tmp_path / "tok"))
    assert loaded.config == config and loaded.fingerprint() == tok.fingerprint()
    assert torch.equal(loaded.encode(images), codes)
    assert torch.equal(loaded.decode(codes), tok.decode(codes))
    assert torch.allclose(tok.decode(codes), tok(images, hardness=1.0).reconstruction.clamp(-1, 1), atol=1e-5)


def test_a_config_json_without_kind_loads_as_vq(tmp_path):
    import json

    config = TokenizerConfig(resolution=16, base_channels=8, channel_multipliers=[1, 2], latent_channels=8,
                             norm_num_groups=4, quantizer=QuantizerConfig(codebook_size=32, codebook_dim=4))
    folder = ProVQTokenizer(config).save_pretrained(tmp_path / "tok")
    record = json.loads((folder / "config.json").read_text())
    for name in ("kind", "levels", "bits", "entropy_weight", "diversity_weight", "entropy_temperature",
                 "entropy_group_bits"):
        del record["quantizer"][name]  # what a file written before the families holds
    (folder / "config.json").write_text(json.dumps(record))
    loaded = ProVQTokenizer.from_pretrained(folder)
    assert loaded.config.quantizer.kind == "vq" and loaded.config == config


def test_codebook_dim_keeps_its_meaning_in_saved_files(tmp_path):
    """Unset (0), codebook_dim is the family's: 8 for vq, the code's channels for fsq/lfq. A file keeps
    the resolved value, so null (vq: no projection, taming's conversions), a vq dimension, an fsq/lfq
    file's own channel count, and a file written without the field (the old default 8) load as before."""
    import json

    assert QuantizerConfig().codebook_dim == 8 and QuantizerConfig(codebook_dim=None).codebook_dim is None
    assert QuantizerConfig(kind="fsq", levels=[8, 5, 5, 5]).codebook_dim == 4
    for saved in (None, 4):  # a preset's null, a saved config.json's resolved value
        assert QuantizerConfig(kind="fsq", levels=[8, 5, 5, 5], codebook_dim=saved).codebook_dim == 4
    assert QuantizerConfig(kind="lfq", bits=8, codebook_dim=8).codebook_dim == 8
    for kind, dim in (("vq", None), ("vq", 4), ("fsq", 4), ("lfq", 6)):
        base = {"codebook_size": 32, "codebook_dim": dim} if kind == "vq" else {}
        config = TokenizerConfig(resolution=16, base_channels=8, channel_multipliers=[1, 2], latent_channels=8,
                                 norm_num_groups=4, quantizer=QuantizerConfig(kind=kind, **base, **FAMILIES[kind]))
        folder = ProVQTokenizer(config).save_pretrained(tmp_path / f"{kind}{dim}")
        assert ProVQTokenizer.from_pretrained(folder).config == config
    record = json.loads((folder / "config.json").read_text())  # lfq
    del record["quantizer"]["codebook_dim"]
    (folder / "config.json").write_text(json.dumps(record))
    assert ProVQTokenizer.from_pretrained(folder).config.quantizer.codebook_dim == 6
    vq = tmp_path / "vqNone"
    record = json.loads((vq / "config.json").read_text())
    del record["quantizer"]["codebook_dim"]  # written before the field existed: the old default, 8
    (vq / "config.json").write_text(json.dumps(record))
    assert ProVQTokenizer.read_config(vq / "config.json").quantizer.codebook_dim == 8


def test_lfq_entropy_lowers_per_sample_and_raises_batch_entropy_under_gradient():
    torch.manual_seed(0)
    z = (torch.randn(256, 4) * 0.002 + 0.004).requires_grad_(True)  # collapsed on one code
    optimizer = torch.optim.SGD([z], lr=1e-4)
    first = None
    for _ in itertools.repeat(None, 50):
        per_sample, batch, _ = lfq_entropy_terms(z, 100.0, 10)
        first = first or (per_sample.item(), batch.item())
        optimizer.zero_grad()
        (per_sample - batch).backward()
        optimizer.step()
    per_sample, batch, _ = lfq_entropy_terms(z, 100.0, 10)
    assert per_sample.item() < first[0] and batch.item() > first[1]
