"""Tests of the AR prior (generator/model.py) and the code shards (generator/code_shards.py)."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file

from generator import (
    ARPrior,
    CodeDataset,
    CodeRangeError,
    CodeShardWriter,
    CodesManifest,
    FingerprintMismatchError,
    PriorConfig,
    load_manifest,
)
from generator.code_shards import shard_name
from provq.common.errors import FormatError

TINY = dict(codebook_size=64, code_height=4, code_width=4, num_classes=3, hidden_size=32,
            num_layers=2, num_heads=2, intermediate_size=64)


def tiny_prior(seed=0, **overrides):
    torch.manual_seed(seed)
    return ARPrior(PriorConfig(**{**TINY, **overrides})).eval()


def random_codes(batch, config, seed=1):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, config.codebook_size, (batch, config.code_height, config.code_width),
                          generator=g)
    labels = torch.randint(0, config.num_classes, (batch,), generator=g)
    return codes, labels


# ---- model --------------------------------------------------------------------------------
def test_output_shapes_and_logits_over_image_codes_only():
    prior = tiny_prior()
    codes, labels = random_codes(5, prior.config)
    out = prior(codes, labels)
    assert out.logits.shape == (5, 16, 64)
    targets = codes.reshape(5, 16)  # next-code cross entropy and accuracy, computed here from the logits
    assert out.loss.item() == pytest.approx(F.cross_entropy(out.logits.reshape(-1, 64), targets.reshape(-1)).item(),
                                            rel=1e-6)
    assert out.accuracy.item() == pytest.approx((out.logits.argmax(-1) == targets).float().mean().item())
    # (B, N) input gives the same result as (B, h, w)
    torch.testing.assert_close(prior(codes.flatten(1), labels).logits, out.logits)


def test_causal_mask_later_tokens_do_not_change_earlier_logits():
    prior = tiny_prior()
    codes, labels = random_codes(3, prior.config)
    flat = codes.flatten(1)
    changed = flat.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % prior.config.codebook_size
    before, after = prior(flat, labels).logits, prior(changed, labels).logits
    # Position t sees [class, code_1..code_t]: changing codes 8.. leaves positions 0..7 alone.
    torch.testing.assert_close(before[:, :8], after[:, :8], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, 8:], after[:, 8:])


def test_class_token_conditions_every_position():
    prior = tiny_prior()
    codes, _ = random_codes(2, prior.config)
    a = prior(codes, torch.tensor([0, 0])).logits
    b = prior(codes, torch.tensor([1, 1])).logits
    assert not torch.allclose(a[:, 0], b[:, 0]) and not torch.allclose(a[:, -1], b[:, -1])


def test_initial_loss_is_about_log_codebook_size():
    prior = tiny_prior(codebook_size=512)
    codes, labels = random_codes(16, prior.config)
    loss = prior(codes, labels).loss.item()
    assert abs(loss - math.log(512)) < 0.1 * math.log(512)


def test_label_dropout_uses_only_the_given_generator():
    prior = tiny_prior(class_dropout=0.5).train()
    tokens = prior.class_tokens(torch.arange(3).repeat(20))
    first = prior.drop_labels(tokens, torch.Generator().manual_seed(7))
    torch.manual_seed(123)  # the global RNG must not matter
    again = prior.drop_labels(tokens, torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    null = first == prior.config.null_token
    assert 0 < null.sum() < len(tokens)
    assert torch.equal(first[~null], tokens[~null])
    with pytest.raises(ValueError, match="Generator"):
        prior(*random_codes(2, prior.config))
    prior.eval()  # no dropout when evaluating
    assert torch.equal(prior.drop_labels(tokens, None), tokens)


def test_unlabelled_items_use_the_null_token():
    prior = tiny_prior()
    assert prior.class_tokens(torch.tensor([-1]), allow_null=True).item() == prior.config.null_token
    with pytest.raises(CodeRangeError):
        prior.class_tokens(torch.tensor([-1]))


def test_bad_inputs_raise_clear_errors():
    prior = tiny_prior()
    codes, labels = random_codes(2, prior.config)
    with pytest.raises(CodeRangeError, match=r"\[0, 64\)"):
        prior(codes + 64, labels)
    with pytest.raises(CodeRangeError):
        prior(codes - 100, labels)
    with pytest.raises(CodeRangeError, match="labels"):
        prior(codes, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="codes must be"):
        prior(codes[:, :3], labels)
    with pytest.raises(TypeError):
        prior(codes.float(), labels)
    with pytest.raises(ValueError, match="labels"):
        prior(codes, labels[:1])
    with pytest.raises(ValueError, match="num_heads"):
        PriorConfig(**{**TINY, "num_heads": 3})


def test_save_load_gives_identical_logits(tmp_path):
    prior = tiny_prior(tokenizer_fingerprint="abc123")
    prior.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]  # + card
    assert json.loads((tmp_path / "config.json").read_text())["tokenizer_fingerprint"] == "abc123"
    loaded = ARPrior.from_pretrained(tmp_path)
    assert loaded.config == prior.config
    codes, labels = random_codes(3, prior.config)
    assert torch.equal(prior(codes, labels).logits, loaded(codes, labels).logits)
    loaded.check_tokenizer("abc123")
    with pytest.raises(FingerprintMismatchError, match="abc123.*zzz999"):
        loaded.check_tokenizer("zzz999")


def test_load_refuses_newer_versions_unknown_fields_and_missing_tensors(tmp_path):
    prior = tiny_prior()
    prior.save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    good = json.loads(config_path.read_text())
    assert (good["model_type"], good["config_version"]) == ("provq-ar-prior", 3)
    config_path.write_text(json.dumps({**good, "config_version": 99}))
    with pytest.raises(FormatError, match="config_version 99, newer than this version's 3"):
        ARPrior.from_pretrained(tmp_path)
    config_path.write_text(json.dumps({k: v for k, v in good.items() if k != "config_version"}))
    with pytest.raises(FormatError, match="no valid integer 'config_version'"):
        ARPrior.from_pretrained(tmp_path)
    config_path.write_text(json.dumps({**good, "rope_scaling": 2}))
    with pytest.raises(FormatError, match="rope_scaling"):
        ARPrior.from_pretrained(tmp_path)
    config_path.write_text(json.dumps({**good, "model_type": "provq-tokenizer"}))
    with pytest.raises(FormatError, match="is a tokenizer folder .*; expected a prior folder"):
        ARPrior.from_pretrained(tmp_path)
    # a field missing from the file takes its default: here that contradicts the weights
    config_path.write_text(json.dumps({k: v for k, v in good.items() if k != "codebook_size"}))
    with pytest.raises(FormatError, match="shape"):
        ARPrior.from_pretrained(tmp_path)
    config_path.write_text(json.dumps(good))
    weights = load_file(str(tmp_path / "model.safetensors"))
    name = sorted(weights)[0]
    del weights[name]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(FormatError, match=f"lacks tensor '{name}'"):
        ARPrior.from_pretrained(tmp_path)


def test_a_prior_saved_by_version_1_loads_as_it_was(tmp_path):
    """Version 1 had one dropout rate (attention and embeddings) and 1D positions only."""
    prior = tiny_prior(attention_dropout=0.1, token_dropout=0.1)
    prior.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    v1 = {k: v for k, v in config.items() if k not in ("attention_dropout", "residual_dropout", "ffn_dropout",
                                                        "token_dropout", "position_embedding", "zero_init_head")}
    (tmp_path / "config.json").write_text(json.dumps({**v1, "dropout": 0.1, "config_version": 1}))
    loaded = ARPrior.from_pretrained(tmp_path)
    assert loaded.config == prior.config
    assert (loaded.config.position_embedding, loaded.config.residual_dropout) == ("rope_1d", 0.0)
    codes, labels = random_codes(2, prior.config)
    assert torch.equal(loaded(codes, labels).logits, prior.eval()(codes, labels).logits)


def test_class_names_are_stored_with_the_prior_and_a_version_2_prior_loads_without_them(tmp_path):
    """Version 3 added label_names; a version-2 file has none and shows its classes as numbers, as before."""
    prior = tiny_prior(label_names=["cat", "dog", "owl"])
    prior.save_pretrained(tmp_path)
    assert ARPrior.from_pretrained(tmp_path).config.label_names == ["cat", "dog", "owl"]
    assert "3 classes (cat, dog, owl)" in (tmp_path / "README.md").read_text()
    config = json.loads((tmp_path / "config.json").read_text())
    v2 = {k: v for k, v in config.items() if k != "label_names"}
    (tmp_path / "config.json").write_text(json.dumps({**v2, "config_version": 2}))
    loaded = ARPrior.from_pretrained(tmp_path)
    assert loaded.config.label_names == [] and loaded.config.num_classes == 3
    with pytest.raises(ValueError, match="2 names for 3 classes"):
        tiny_prior(label_names=["cat", "dog"])


def attention_scores(prior: ARPrior, first: int, second: int) -> torch.Tensor:
    """q.k of sequence positions ``first`` and ``second`` after their rotations, for one unit vector."""
    head_dim = prior.config.hidden_size // prior.config.num_heads
    q = k = torch.nn.functional.normalize(torch.arange(1.0, head_dim + 1), dim=0).repeat(1, 1, 2, 1)
    positions = torch.tensor([[first, second]])
    cos, sin = prior.llama.model.rotary_emb(q, positions)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
    return (q_rot[0, 0, 0] * k_rot[0, 0, 1]).sum()


def test_2d_rotary_positions_follow_the_grid_not_the_raster_order():
    flat, grid = tiny_prior(position_embedding="rope_1d"), tiny_prior(position_embedding="rope_2d")
    # Sequence position p holds code p - 1 of the 4x4 grid: (row, column) = divmod(p - 1, 4).
    # Codes (0,3)-(1,0) are neighbours in raster order, as are (0,0)-(0,1): 1D sees the same offset,
    # 2D does not; a whole-grid shift by one row and one column keeps every 2D offset.
    assert attention_scores(flat, 4, 5) == pytest.approx(attention_scores(flat, 1, 2).item(), abs=1e-6)
    assert abs(attention_scores(grid, 4, 5) - attention_scores(grid, 1, 2)) > 1e-3
    assert attention_scores(grid, 6, 7) == pytest.approx(attention_scores(grid, 1, 2).item(), abs=1e-6)
    assert attention_scores(grid, 1, 6) == pytest.approx(attention_scores(grid, 6, 11).item(), abs=1e-6)
    # The class token (position 0) gets cos = sin = 0, as in LlamaGen: its query and key vanish.
    cos, sin = grid.llama.model.rotary_emb(torch.zeros(1), torch.tensor([[0]]))
    assert not cos.any() and not sin.any()
    # Same weights, other positions: other logits; the weights file is the same either way.
    grid.load_state_dict(flat.state_dict())
    codes, labels = random_codes(2, flat.config)
    assert not torch.allclose(grid(codes, labels).logits, flat(codes, labels).logits)


def test_llamagen_dropouts_and_zero_head():
    prior = tiny_prior(residual_dropout=0.5, ffn_dropout=0.5, token_dropout=0.0, zero_init_head=True)
    assert not prior.llama.lm_head.weight.any()
    codes, labels = random_codes(2, prior.config)
    prior.llama.lm_head.weight.data.normal_()
    evaluated = prior.eval()(codes, labels).logits
    assert torch.equal(evaluated, prior(codes, labels).logits)  # no dropout when evaluating
    prior.train()
    torch.manual_seed(0)
    first = prior(codes, labels, generator=torch.Generator().manual_seed(0)).logits
    assert not torch.allclose(first, evaluated)  # dropout on the block outputs while training
    assert sorted(prior.state_dict()) == sorted(tiny_prior().state_dict())  # hooks add no weights


# ---- code shards --------------------------------------------------------------------------
def make_manifest(**overrides):
    fields = dict(tokenizer_fingerprint="tok-A", code_shape=(4, 4), codebook_size=64,
                  num_classes=3, split="train", num_items=7, flip_copies=True,
                  label_names=["a", "b", "c"], shard_size=3)
    return CodesManifest(**{**fields, **overrides})


def fake_codes(manifest, index, offset=0):
    n = len(manifest.shard_items(index))
    rng = np.random.default_rng(index + offset)
    codes = rng.integers(0, manifest.codebook_size, (n, manifest.num_copies, *manifest.code_shape))
    return codes, rng.integers(-1, manifest.num_classes, n)


def write_all(root, manifest):
    writer = CodeShardWriter(root, manifest)
    written = {}
    for index in writer.pending_shards():
        written[index] = fake_codes(manifest, index)
        assert writer.write_shard(index, *written[index])
    writer.finalize()
    return written


def test_code_shards_round_trip(tmp_path):
    manifest = make_manifest()
    written = write_all(tmp_path, manifest)
    assert len(written) == 3  # 7 items in shards of 3
    loaded = load_manifest(tmp_path, "train")
    assert loaded.dtype == "uint16" and loaded.code_shape == (4, 4) and loaded.num_items == 7
    assert load_file(str(tmp_path / "train" / shard_name(0)))["codes"].dtype == np.uint16
    ds = CodeDataset(tmp_path, "train", expected_fingerprint="tok-A")
    assert len(ds) == 14 and ds.label_names == ["a", "b", "c"]
    for i in range(len(ds)):
        item, copy = divmod(i, 2)
        codes, labels = written[item // 3]
        assert ds[i]["codes"].dtype == torch.long and ds[i]["codes"].shape == (4, 4)
        assert np.array_equal(ds[i]["codes"].numpy(), codes[item % 3, copy])
        assert ds[i]["label"] == labels[item % 3]


def test_large_codebooks_are_stored_as_int32(tmp_path):
    manifest = make_manifest(codebook_size=70_000, flip_copies=False, num_items=2)
    write_all(tmp_path, manifest)
    assert load_manifest(tmp_path, "train").dtype == "int32"
    ds = CodeDataset(tmp_path, "train")
    assert int(ds[0]["codes"].max()) < 70_000


def test_fingerprint_mismatch_names_both(tmp_path):
    write_all(tmp_path, make_manifest())
    with pytest.raises(FingerprintMismatchError, match="tok-A.*tok-B"):
        CodeDataset(tmp_path, "train", expected_fingerprint="tok-B")
    with pytest.raises(FingerprintMismatchError, match="tok-A.*tok-B"):
        load_manifest(tmp_path, "train").check_tokenizer("tok-B")
    with pytest.raises(FingerprintMismatchError):  # a folder of another tokenizer is not reused
        CodeShardWriter(tmp_path, make_manifest(tokenizer_fingerprint="tok-B"))


def test_out_of_range_codes_rejected_at_write_and_at_load(tmp_path):
    manifest = make_manifest()
    writer = CodeShardWriter(tmp_path, manifest)
    codes, labels = fake_codes(manifest, 0)
    with pytest.raises(CodeRangeError, match=r"\[0, 64\)"):
        writer.write_shard(0, codes + 64, labels)
    with pytest.raises(CodeRangeError, match="labels"):
        writer.write_shard(0, codes, labels + 5)
    with pytest.raises(ValueError, match="wants codes"):
        writer.write_shard(0, codes[:2], labels[:2])
    write_all(tmp_path, manifest)
    path = tmp_path / "train" / shard_name(1)
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors["codes"][0, 0, 0, 0] = 64  # corrupted on disk, same metadata
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CodeRangeError, match="shard-00001"):
        CodeDataset(tmp_path, "train")


def test_writer_resumes_at_shard_level(tmp_path):
    manifest = make_manifest()
    writer = CodeShardWriter(tmp_path, manifest)
    assert writer.pending_shards(rank=0, world_size=2) == [0, 2]
    assert writer.pending_shards(rank=1, world_size=2) == [1]
    writer.write_shard(0, *fake_codes(manifest, 0))
    with pytest.raises(RuntimeError, match=r"shards \[1, 2\]"):
        writer.finalize()
    (tmp_path / "train" / shard_name(1)).write_bytes(b"torn")  # an interrupted, foreign write
    stamp = (tmp_path / "train" / shard_name(0)).stat().st_mtime_ns
    resumed = CodeShardWriter(tmp_path, manifest)
    assert resumed.pending_shards() == [1, 2]
    assert not resumed.write_shard(0, *fake_codes(manifest, 0, offset=9))  # kept, not rewritten
    assert (tmp_path / "train" / shard_name(0)).stat().st_mtime_ns == stamp
    # a different shard plan (size) does not count the old shard as done
    assert CodeShardWriter(tmp_path, make_manifest(shard_size=4)).pending_shards() == [0, 1]


def test_manifest_refuses_newer_format(tmp_path):
    write_all(tmp_path, make_manifest())
    path = tmp_path / "train" / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 7}))
    with pytest.raises(FormatError, match="format_version 7, newer"):
        load_manifest(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="manifest"):
        load_manifest(tmp_path, "test")


def test_the_transformers_floor_is_a_version_with_what_the_prior_reads():
    """generator/positions.py reads LlamaConfig.rope_parameters (transformers 5): pyproject must not
    admit an older transformers than the one whose attributes the code uses."""
    import re

    import transformers
    from training_helpers import REPO
    from transformers import LlamaConfig

    floor = re.search(r'"transformers>=(\d+)\.', (REPO / "pyproject.toml").read_text()).group(1)
    assert int(floor) >= 5 and int(transformers.__version__.split(".")[0]) >= int(floor)
    assert "rope_theta" in (LlamaConfig(hidden_size=32, num_attention_heads=2).rope_parameters or {})
