"""ProVQTokenizer, its files, losses and discriminator (tiny configs, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from provq.common.errors import FormatError, MissingFileError
from tokenizer import (
    DiscriminatorConfig,
    LPIPSLoss,
    PatchDiscriminator,
    ProVQTokenizer,
    QuantizerConfig,
    TokenizerConfig,
    adaptive_gan_weight,
    hinge_d_loss,
    hinge_g_loss,
    make_perceptual_loss,
    reconstruction_loss,
)


def tiny_config(**quantizer) -> TokenizerConfig:
    fields = dict(codebook_size=32, codebook_dim=4, l2_normalize=True, kmeans_init=False)
    fields.update(quantizer)
    return TokenizerConfig(
        resolution=16, base_channels=8, channel_multipliers=[1, 2], num_res_blocks=1,
        latent_channels=8, norm_num_groups=4, quantizer=QuantizerConfig(**fields),
    )


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return ProVQTokenizer(tiny_config())


def images(batch=2, resolution=16, seed=1):
    return torch.rand(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_forward_encode_decode_shapes(tiny):
    x = images()
    out = tiny(x, hardness=0.5)
    assert out.reconstruction.shape == x.shape
    assert tiny.code_shape == (8, 8) and out.quantizer.indices.shape == (2, 8, 8)
    codes = tiny.encode(x)
    assert codes.dtype == torch.long and codes.shape == (2, *tiny.code_shape)
    assert torch.equal(codes, tiny(x, hardness=1.0).quantizer.indices)
    decoded = tiny.decode(codes)
    assert decoded.shape == x.shape and decoded.abs().max() <= 1.0
    # decode(encode(x)) is the hard (h = 1) reconstruction, clamped.
    hard = tiny(x, hardness=1.0).reconstruction.clamp(-1, 1)
    assert torch.allclose(decoded, hard, atol=1e-5)


def test_gradients_reach_encoder_at_full_hardness(tiny):
    out = tiny(images(), hardness=1.0)
    (reconstruction_loss(out.reconstruction, images()) + out.quantizer.loss).backward()
    assert tiny.encoder.conv_in.weight.grad.abs().sum() > 0
    assert tiny.quantizer.codebook.weight.grad.abs().sum() > 0


def test_bf16_autocast_keeps_quantizer_in_float32(tiny):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny(images(), hardness=0.5)
    assert out.quantizer.z_e.dtype == torch.float32 and out.quantizer.loss.dtype == torch.float32
    full = tiny(images(), hardness=0.5)
    assert torch.allclose(out.quantizer.z_e, full.quantizer.z_e, atol=0.05)  # the encoder's bf16 rounding only
    with torch.autocast("cpu", dtype=torch.bfloat16):  # continuous (no code can flip): bf16 rounding only
        low = tiny(images(), hardness=0.0).reconstruction.float()
    high = tiny(images(), hardness=0.0).reconstruction
    assert (low - high).abs().mean() / high.abs().mean() < 0.05


# ---- files -----------------------------------------------------------------------------------
def test_save_load_identical(tiny, tmp_path):
    folder = tiny.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]  # + card
    assert json.loads((folder / "config.json").read_text())["config_version"] == 1
    loaded = ProVQTokenizer.from_pretrained(folder)
    assert loaded.config == tiny.config and loaded.fingerprint() == tiny.fingerprint()
    x = images()
    tiny.eval()
    assert torch.equal(loaded.encode(x), tiny.encode(x))
    assert torch.equal(loaded(x, 0.3).reconstruction, tiny(x, 0.3).reconstruction)
    with torch.no_grad():
        tiny.quantizer.codebook.weight[0] += 1
    assert loaded.fingerprint() != tiny.fingerprint()


def test_from_pretrained_names_missing_and_mismatched_tensors(tiny, tmp_path):
    folder = tiny.save_pretrained(tmp_path / "tok")
    weights = load_file(str(folder / "model.safetensors"))
    name = "decoder.conv_out.weight"
    save_file({k: v for k, v in weights.items() if k != name}, str(folder / "model.safetensors"))
    with pytest.raises(FormatError, match=name):
        ProVQTokenizer.from_pretrained(folder)
    weights[name] = torch.zeros(1, 2, 3)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(FormatError, match=rf"{name}.*shape"):
        ProVQTokenizer.from_pretrained(folder)


def test_from_pretrained_rejects_newer_version_and_unknown_fields(tiny, tmp_path):
    folder = tiny.save_pretrained(tmp_path / "tok")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "config_version": 99}))
    with pytest.raises(FormatError, match="newer"):
        ProVQTokenizer.from_pretrained(folder)
    config["quantizer"]["codebok_size"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match="quantizer.codebok_size"):
        ProVQTokenizer.from_pretrained(folder)
    with pytest.raises(MissingFileError, match="neither"):
        ProVQTokenizer.from_pretrained(tmp_path / "missing")


def test_from_pretrained_hub_repo_id(tiny, tmp_path, monkeypatch):
    import huggingface_hub

    folder = tiny.save_pretrained(tmp_path / "tok")
    fetched = []

    def fake_download(repo_id, filename, revision=None):  # stands in for the Hub, offline
        fetched.append((repo_id, filename))
        return str(folder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    loaded = ProVQTokenizer.from_pretrained("someone/provq-demo")
    assert loaded.fingerprint() == tiny.fingerprint()
    assert fetched == [("someone/provq-demo", "config.json"), ("someone/provq-demo", "model.safetensors")]

    def offline(repo_id, filename, revision=None):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(MissingFileError, match="Hub"):
        ProVQTokenizer.from_pretrained("someone/provq-demo")


def test_kmeans_state_stays_out_of_exported_weights(tmp_path):
    tok = ProVQTokenizer(tiny_config(kmeans_init=True)).train()
    tok(images(), hardness=0.0)
    assert len(tok.quantizer.kmeans_buffer) > 0
    weights = load_file(str(tok.save_pretrained(tmp_path / "tok") / "model.safetensors"))
    assert "quantizer.initialized" in weights
    assert not any("kmeans" in k or "steps_since" in k for k in weights)


# ---- losses and discriminator ----------------------------------------------------------------
def test_lpips_random_trunk_zero_for_identical_images():
    loss = LPIPSLoss(net="alex", random_trunk=True)  # not LPIPS: a smoke test of the wrapper
    x, y = images(resolution=32), images(resolution=32, seed=2)
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(x, y).item() > 0
    assert make_perceptual_loss(0.0) is None


def test_lpips_clear_error_without_trunk_weights(monkeypatch):
    import lpips

    def offline(**kwargs):
        raise OSError("no network")

    monkeypatch.setattr(lpips, "LPIPS", offline)
    with pytest.raises(MissingFileError, match="perceptual weight to 0"):
        make_perceptual_loss(1.0, net="vgg")


def test_reconstruction_and_hinge_losses():
    x = torch.zeros(1, 3, 2, 2)
    assert reconstruction_loss(x + 2, x, "l1").item() == 2.0
    assert reconstruction_loss(x + 2, x, "l2").item() == 4.0
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == 1.0
    assert hinge_g_loss(torch.full((4,), 3.0)).item() == -3.0


def test_discriminator_and_adaptive_weight_finite(tiny):
    disc = PatchDiscriminator(DiscriminatorConfig(base_channels=8, num_layers=2))
    x = images()
    logits_real = disc(x)
    assert logits_real.shape == (2, 1, 2, 2)  # 16 -> 8 -> 4 -> 3 -> 2 (taming shape)
    out = tiny(x, hardness=1.0)
    nll = reconstruction_loss(out.reconstruction, x)
    g_loss = hinge_g_loss(disc(out.reconstruction))
    weight = adaptive_gan_weight(nll, g_loss, tiny.last_layer)
    # taming's rule, by hand: |d nll / d last| / (|d g / d last| + 1e-4), clamped to [0, 1e4]
    (g_nll,) = torch.autograd.grad(nll, tiny.last_layer, retain_graph=True)
    (g_gan,) = torch.autograd.grad(g_loss, tiny.last_layer, retain_graph=True)
    expected = (g_nll.norm() / (g_gan.norm() + 1e-4)).clamp(0, 1e4)
    assert weight.item() == pytest.approx(expected.item(), rel=1e-5) and not weight.requires_grad
    hinge_d_loss(logits_real, disc(out.reconstruction.detach())).backward()
    assert disc.main[0].weight.grad is not None
