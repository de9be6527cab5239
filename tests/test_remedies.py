"""The remedies as quantizer options: EMA codebook, dead-code restart, rotation trick, SimVQ (tiny, CPU).

vector-quantize-pytorch is the oracle, run beside ours on the same tensors; where our semantics differ
on purpose, the test says so and checks ours against a hand calculation instead.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from training_helpers import (
    compare_folders,
    logged_steps,
    metric_rows,
    run_in_process,
    tiny_tokenizer_argv,
)
from vector_quantize_pytorch import SimVQ, VectorQuantize

from provq import training
from provq.commands import train_tokenizer
from provq.common.errors import ConfigError
from provq.common.typed_config import build_config
from tokenizer import ProVQTokenizer, TokenizerConfig
from tokenizer.quantizer import ProgressiveQuantizer, QuantizerConfig

REMEDIES = {"ema": {"ema_codebook": True}, "restart": {"dead_code_threshold": 1.0},
            "rotation": {"rotation_trick": True}, "simvq": {"simvq": True}}


def vq(dim: int = 6, **fields) -> ProgressiveQuantizer:
    torch.manual_seed(0)
    base = dict(codebook_size=16, codebook_dim=None, l2_normalize=False, kmeans_init=False)
    return ProgressiveQuantizer(dim, QuantizerConfig(**(base | fields)))


def rows(*shape, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def vector_quantize_beside(ours: ProgressiveQuantizer, l2: bool, **fields) -> VectorQuantize:
    """Their VectorQuantize holding our codebook, with the EMA state it starts every codebook from."""
    theirs = VectorQuantize(dim=6, codebook_size=ours.config.codebook_size, decay=0.99, use_cosine_sim=l2,
                            **({"rotation_trick": False} | fields)).train()
    codes = ours.codebook_vectors().detach()
    with torch.no_grad():
        theirs._codebook.embed.copy_(codes[None])
        theirs._codebook.embed_avg.copy_(codes[None])
    assert torch.equal(theirs._codebook.cluster_size, torch.ones(1, codes.shape[0]))
    return theirs


# ---- every remedy under the curriculum -------------------------------------------------------
@pytest.mark.parametrize("mechanism", ["interpolate", "stochastic"])
@pytest.mark.parametrize("remedy", list(REMEDIES))
def test_each_remedy_keeps_the_curriculum_endpoints(remedy, mechanism):
    quantizer = vq(mechanism=mechanism, l2_normalize=True, **REMEDIES[remedy]).train()
    z = rows(2, 6, 4, 4)
    assert torch.equal(quantizer(z, hardness=0.0).z_out, quantizer(z, 0.0).z_e)  # h = 0: exactly z_e
    hard = quantizer(z, hardness=1.0)
    assert torch.equal(hard.z_out, hard.z_q)  # h = 1: exactly the codes, bitwise
    mid = quantizer(z, hardness=0.5, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(mid.z_out, mid.z_e) and not torch.equal(mid.z_out, mid.z_q)


# ---- rotation trick --------------------------------------------------------------------------
@pytest.mark.parametrize("l2", [False, True])
def test_rotation_trick_gradients_equal_vector_quantize_pytorch(l2):
    ours = vq(rotation_trick=True, l2_normalize=l2).train()
    theirs = vector_quantize_beside(ours, l2, ema_update=False, rotation_trick=True)
    x, weight = rows(2, 5, 6, scale=2.0), rows(2, 5, 6, seed=1)
    x_ours, x_theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = ours(x_ours, hardness=1.0)
    quantized, indices, _ = theirs(x_theirs)
    assert torch.equal(out.indices, indices)
    assert torch.equal(out.z_out, out.z_q)  # ours: the code itself; theirs: the rotated vector, z_q up to rounding
    assert torch.allclose(quantized, out.z_q, atol=1e-5)
    (out.z_out * weight).sum().backward()
    (quantized * weight).sum().backward()
    assert torch.allclose(x_ours.grad, x_theirs.grad, atol=1e-5)
    plain = x.clone().requires_grad_(True)
    (vq(l2_normalize=l2)(plain, hardness=1.0).z_out * weight).sum().backward()
    assert not torch.allclose(plain.grad, x_ours.grad, atol=1e-3)  # not the straight-through's gradient


def test_rotation_trick_takes_the_straight_through_place_in_the_mix():
    """Our extension, no oracle: under interpolation the decoder gets (1 - h) z_e + h z_rot, so the
    gradient is (1 - h) times the identity's plus h times the rotation's; under the stochastic mask,
    each position has one or the other."""
    x, weight = rows(3, 4, 6), rows(3, 4, 6, seed=1)

    def gradient(hardness, mechanism="interpolate", generator=None):
        z = x.clone().requires_grad_(True)
        out = vq(rotation_trick=True, mechanism=mechanism)(z, hardness, generator)
        (out.z_out * weight).sum().backward()
        return out, z.grad

    continuous, rotated = gradient(0.0)[1], gradient(1.0)[1]
    out, mixed = gradient(0.3)
    assert torch.allclose(out.z_out, 0.7 * out.z_e + 0.3 * out.z_q, atol=1e-6)
    assert torch.allclose(mixed, 0.7 * continuous + 0.3 * rotated, atol=1e-6)
    out, masked = gradient(0.5, "stochastic", torch.Generator().manual_seed(3))
    hard = (out.z_out == out.z_q).all(-1, keepdim=True)
    assert 0 < hard.float().mean() < 1
    assert torch.allclose(masked, torch.where(hard, rotated, continuous), atol=1e-6)


# ---- SimVQ -----------------------------------------------------------------------------------
@pytest.mark.parametrize("rotation", [False, True])
def test_simvq_codes_indices_loss_and_gradients_equal_vector_quantize_pytorch(rotation):
    ours = vq(simvq=True, codebook_size=32, rotation_trick=rotation).train()
    theirs = SimVQ(dim=6, codebook_size=32, rotation_trick=rotation)  # commit weights 1 and 0.25: beta
    with torch.no_grad():
        theirs.frozen_codebook.copy_(ours.codebook.basis)
        theirs.code_transform.weight.copy_(ours.codebook.map.weight)
    x = rows(2, 10, 6)
    x_ours, x_theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = ours(x_ours, hardness=1.0)
    quantized, indices, loss = theirs(x_theirs)
    assert torch.equal(out.indices, indices)
    assert torch.allclose(out.z_out, quantized, atol=1e-6)
    assert torch.allclose(ours.codebook_vectors(), theirs.codebook, atol=1e-6)
    assert torch.allclose(ours.decode_indices(indices), theirs.indices_to_codes(indices), atol=1e-6)
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-5)  # omega(1) = 1
    weight = rows(2, 10, 6, seed=1)
    (out.loss + (out.z_out * weight).sum()).backward()
    (loss + (quantized * weight).sum()).backward()
    assert torch.allclose(ours.codebook.map.weight.grad, theirs.code_transform.weight.grad, atol=1e-5)
    assert torch.allclose(x_ours.grad, x_theirs.grad, atol=1e-5)


def test_simvq_basis_is_frozen_exported_and_l2_codes_are_the_normalized_map():
    quantizer = vq(simvq=True, l2_normalize=True)
    assert [name for name, p in quantizer.named_parameters() if p.requires_grad] == ["codebook.map.weight"]
    assert {"codebook.basis", "codebook.map.weight"} <= set(quantizer.state_dict())  # decoding needs both
    by_hand = F.normalize(quantizer.codebook.basis @ quantizer.codebook.map.weight.T, dim=-1)
    assert torch.allclose(quantizer.codebook_vectors(), by_hand, atol=1e-6)
    assert QuantizerConfig(simvq=True).kmeans_init is False  # unset: no k-means for an implicit codebook


# ---- EMA codebook ----------------------------------------------------------------------------
@pytest.mark.parametrize("l2", [False, True])
def test_ema_codebook_steps_equal_vector_quantize_pytorch(l2):
    ours = vq(ema_codebook=True, l2_normalize=l2, codebook_size=8).train()
    theirs = vector_quantize_beside(ours, l2)
    for step in range(3):
        x = rows(4, 12, 6, seed=step)
        out = ours(x, hardness=1.0)
        _, indices, _ = theirs(x)
        assert torch.equal(out.indices, indices), step
        assert torch.allclose(ours.code_ema.code_use, theirs._codebook.cluster_size[0], atol=1e-6)
        assert torch.allclose(ours.code_ema.code_sum, theirs._codebook.embed_avg[0], atol=1e-6)
        assert torch.allclose(ours.codebook_vectors(), theirs.codebook, atol=1e-6), step
    assert out.codebook_loss.item() == 0.0 and out.loss.item() > 0  # the commitment term stays
    assert not ours.codebook.weight.requires_grad  # out of the optimizer: the EMA writes the codes
    assert set(ours.state_dict()) == set(vq().state_dict())  # the EMA state is not exported


def test_the_ema_restarts_from_the_kmeans_codebook(monkeypatch):
    """Ours differs on purpose: vector-quantize-pytorch starts its EMA state at the k-means counts over
    its init batch; ours starts it as for any codebook just set (each code counted once, at itself),
    so the steps after the init move the codes as after any other start. By hand, one step after."""
    import tokenizer.quantizer as quantizer_module

    fitted = []
    kmeans_codebook = quantizer_module.kmeans_codebook
    monkeypatch.setattr(quantizer_module, "kmeans_codebook", lambda *a, **k: fitted.append(kmeans_codebook(*a, **k))
                        or fitted[-1])
    quantizer = vq(ema_codebook=True, kmeans_init=True, kmeans_buffer=64, l2_normalize=True).train()
    quantizer(rows(2, 6, 4, 4, seed=0) + 2, hardness=0.0)
    assert not quantizer.code_ema.ready  # no EMA step before the codebook is set
    out = quantizer(rows(2, 6, 4, 4, seed=1) + 2, hardness=0.5)
    assert out.initialized_now and len(fitted) == 1
    flat = out.indices.flatten()
    counts = torch.bincount(flat, minlength=16).float()
    sums = torch.zeros(16, 6).index_add_(0, flat, out.z_e.permute(0, 2, 3, 1).reshape(-1, 6))
    assert torch.allclose(quantizer.code_ema.code_use, 0.99 * 1 + 0.01 * counts)
    assert torch.allclose(quantizer.code_ema.code_sum, 0.99 * fitted[0] + 0.01 * sums, atol=1e-6)
    use, total = quantizer.code_ema.code_use, 0.99 * 16 + 0.01 * counts.sum()  # Laplace: (n + eps) / (N + K eps) N
    smoothed = (use + 1e-5) / (total + 16 * 1e-5) * total
    by_hand = F.normalize(quantizer.code_ema.code_sum / smoothed[:, None], dim=-1)
    assert torch.allclose(quantizer.codebook_vectors(), by_hand, atol=1e-6)


def test_the_ema_starts_from_a_loaded_codebook():
    """Weights loaded before training (--init_from, a resume's) are the codebook the EMA starts from."""
    published = vq(l2_normalize=True)
    with torch.no_grad():
        published.codebook.weight.copy_(F.normalize(rows(16, 6, seed=5), dim=-1))
    quantizer = vq(ema_codebook=True, l2_normalize=True).train()
    quantizer.load_state_dict(published.state_dict())
    out = quantizer(rows(2, 5, 6), hardness=1.0)
    flat = out.indices.flatten()
    sums = torch.zeros(16, 6).index_add_(0, flat, out.z_e.reshape(-1, 6))
    assert torch.allclose(quantizer.code_ema.code_sum, 0.99 * published.codebook_vectors() + 0.01 * sums, atol=1e-6)


def test_a_simvq_tokenizer_round_trips_through_its_folder(tmp_path):
    config = TokenizerConfig(resolution=16, base_channels=8, channel_multipliers=[1, 2], latent_channels=8,
                             norm_num_groups=4, quantizer=QuantizerConfig(codebook_size=32, codebook_dim=4, simvq=True))
    torch.manual_seed(0)
    tok = ProVQTokenizer(config).eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    loaded = ProVQTokenizer.from_pretrained(tok.save_pretrained(tmp_path / "tok"))
    assert loaded.config == config and loaded.fingerprint() == tok.fingerprint()
    assert torch.equal(loaded.encode(images), tok.encode(images))
    assert torch.equal(loaded.quantizer.codebook.basis, tok.quantizer.codebook.basis)


# ---- dead-code restart -----------------------------------------------------------------------
def clustered_rows(counts: list[int], codes: torch.Tensor, seed: int) -> torch.Tensor:
    """Rows near codes 0, 1, ...: counts[i] rows next to code i, one batch of one sequence."""
    picked = torch.cat([torch.full((n,), i) for i, n in enumerate(counts)])
    return (codes[picked] + 0.01 * rows(len(picked), codes.shape[1], seed=seed)).unsqueeze(0)


@pytest.mark.parametrize("ema", [True, False])
def test_dead_code_restart_expires_the_same_codes_as_vector_quantize_pytorch(ema, monkeypatch):
    """The same codes expire (EMA use under the threshold after the batch's update). Ours differs on
    purpose in when: it re-seeds them at the start of the next call, from that call's rows, so that no
    autograd graph holds the codebook it writes; the restarted codes are that call's to use at once."""
    ours = vq(ema_codebook=ema, dead_code_threshold=1.05, codebook_size=8).train()
    with torch.no_grad():
        ours.codebook.weight.copy_(torch.eye(8, 6) * 3)  # codes 6, 7 at the origin: never nearest below
    theirs = vector_quantize_beside(ours, l2=False, threshold_ema_dead_code=1.05, ema_update=ema)
    expired_theirs = []
    replace = theirs._codebook.replace
    monkeypatch.setattr(theirs._codebook, "replace", lambda samples, batch_mask, **kw: (
        expired_theirs.append(batch_mask[0].clone()), replace(samples, batch_mask=batch_mask, **kw))[1])
    x = clustered_rows([20, 20, 20, 3, 1], torch.eye(8, 6) * 3, seed=0)  # codes 3-7: under 6 rows each
    out, _ = ours(x, hardness=1.0), theirs(x)
    expired = ours.code_ema.code_use < 1.05
    assert torch.equal(expired, expired_theirs[0]) and expired.nonzero().flatten().tolist() == [3, 4, 5, 6, 7]
    assert out.stats["code_restarts"].item() == 0  # re-seeded at the next call
    before = ours.codebook.weight.clone()
    following = clustered_rows([30, 30, 4], torch.eye(8, 6) * 3, seed=1)
    out = ours(following, hardness=1.0)
    assert out.stats["code_restarts"].item() == 5
    use_now = torch.bincount(out.indices.flatten(), minlength=8).float()
    assert torch.allclose(ours.code_ema.code_use[3:], 0.99 * 1.05 + 0.01 * use_now[3:])  # reset at the threshold
    assert (use_now[3:] >= 1).all()  # each restarted code is the nearest of the row it came from
    if not ema:  # (the EMA's step moves them on after the lookup)
        restarted = (ours.codebook.weight[3:, None] == following[0][None]).all(-1)
        assert restarted.any(1).all() and restarted.any(0).sum() == 5  # five distinct rows of this call
        assert torch.equal(ours.codebook.weight[:3], before[:3])  # the others untouched


def test_restart_is_seeded_and_resumes_from_its_state():
    """Ours, no oracle: the restarted rows are a draw seeded by kmeans_seed and the restarts so far, so a
    run resumed from its checkpointed state restarts the same rows as one that never stopped."""
    def run(quantizer, steps):
        return [quantizer(rows(2, 6, 4, 4, seed=s), hardness=1.0).stats["code_restarts"].item() for s in steps]

    first = vq(ema_codebook=True, dead_code_threshold=1.0, l2_normalize=True).train()
    run(first, range(3))
    state = (first.state_dict(), training.NonPersistentBuffers(first).state_dict())
    assert {"code_ema.code_use", "code_ema.code_sum", "code_ema.ready", "code_ema.restarts"} <= set(state[1])
    resumed = vq(ema_codebook=True, dead_code_threshold=1.0, l2_normalize=True).train()
    resumed.load_state_dict(state[0])
    training.NonPersistentBuffers(resumed).load_state_dict(state[1])
    assert run(resumed, range(3, 6)) == run(first, range(3, 6))
    assert torch.equal(resumed.codebook.weight, first.codebook.weight) and first.code_ema.restarts > 0


# ---- configs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, message", [
    ({"kind": "fsq", "levels": [8, 5], "ema_codebook": True}, r"ema_codebook applies to kind vq only"),
    ({"kind": "lfq", "bits": 4, "rotation_trick": True}, r"rotation_trick applies to kind vq only"),
    ({"kind": "lfq", "bits": 4, "dead_code_threshold": 2.0}, r"dead_code_threshold applies to kind vq only"),
    ({"kind": "fsq", "levels": [8, 5], "simvq": True}, r"simvq applies to kind vq only"),
    ({"simvq": True, "kmeans_init": True}, r"kmeans_init does not apply with simvq"),
    ({"simvq": True, "ema_codebook": True}, r"ema_codebook does not apply with simvq"),
    ({"simvq": True, "dead_code_threshold": 1.0}, r"dead_code_threshold does not apply with simvq"),
    ({"codebook_ema_decay": 1.5}, r"codebook_ema_decay must be in \[0, 1\]"),
    ({"dead_code_threshold": -1.0}, r"dead_code_threshold must be >= 0"),
])
def test_remedy_fields_out_of_place_are_one_clear_error(fields, message):
    with pytest.raises(ConfigError, match=message):
        build_config(QuantizerConfig, fields, prefix="tokenizer.model.quantizer.")


def test_remedies_off_keep_the_export_and_its_fingerprint():
    """Off (the default), nothing of the remedies reaches the weights, and the fingerprint is the one
    tokenizers exported before them have (their config fields are left out while they are off)."""
    import dataclasses
    import hashlib
    import json

    config = TokenizerConfig(resolution=16, base_channels=8, channel_multipliers=[1, 2], latent_channels=8,
                             norm_num_groups=4)
    torch.manual_seed(0)
    tok = ProVQTokenizer(config)
    record = {"config_version": tok.config_version, **dataclasses.asdict(config)}
    for name in ("ema_codebook", "codebook_ema_decay", "dead_code_threshold", "rotation_trick", "simvq",
                 "soft_temperature_start", "soft_temperature_end"):
        del record["quantizer"][name]  # what the fingerprint hashed before these fields existed
    del record["quantizer"]["schedule"]["kmeans_at"]
    digest = hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode())
    for name, tensor in sorted(tok.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    assert tok.fingerprint() == digest.hexdigest()
    assert not any(k.startswith("quantizer.code_ema") for k in tok.state_dict())
    rotated = ProVQTokenizer(dataclasses.replace(config, quantizer=QuantizerConfig(rotation_trick=True)))
    assert rotated.fingerprint() != tok.fingerprint()
    card = "\n".join(ProVQTokenizer.card_content(rotated.config).summary)
    assert "k-means init after the warm-up, rotation trick." in card
    assert "EMA codebook" not in "\n".join(ProVQTokenizer.card_content(config).summary)


# ---- the training script ---------------------------------------------------------------------
@pytest.mark.slow
def test_training_logs_restarts_and_resumes_the_remedy_state_exactly(image_folder, tmp_path):
    out = tmp_path / "run"
    argv = tiny_tokenizer_argv(image_folder, out, 6, quantizer__schedule__kind="step", quantizer__schedule__warmup=2,
                               quantizer__ema_codebook="true", quantizer__dead_code_threshold=8.0,
                               quantizer__rotation_trick="true", train__save_every=3)  # 16 rows per code: restarts
    run_in_process(train_tokenizer.main, argv)
    restarts = [r["quantizer/code_restarts"] for r in logged_steps(out / "metrics.jsonl") if "loss/total" in r]
    assert restarts == sorted(restarts) and restarts[-1] > 0  # a running total, logged every step
    reference = tmp_path / "reference"
    shutil.copytree(out, reference)
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    run_in_process(train_tokenizer.main, argv + ["--resume", "latest"])  # from step 3
    assert compare_folders(reference / "tokenizer", out / "tokenizer") == 0.0
    assert compare_folders(reference / "checkpoints" / "step_00000006", out / "checkpoints" / "step_00000006") == 0.0
    assert metric_rows(out / "metrics.jsonl") == metric_rows(reference / "metrics.jsonl")
