"""Published tokenizers in: LlamaGen's and taming-transformers' VQ models convert exactly.

The fixtures (tests/fixtures/, written by make_convert_fixtures.py from their own code) hold a
small model of each, an input batch and what their code computed from it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from training_helpers import REPO, run_in_process, tiny_tokenizer_argv

from provq.commands import train_tokenizer
from provq.common.errors import ConfigError, FormatError
from provq.common.presets import preset_section
from tokenizer import ProVQTokenizer, TokenizerConfig
from tokenizer.convert import Layout, infer_config, key_map, main, mapped_state

FIXTURES = REPO / "tests" / "fixtures"


def read_fixture(source: str) -> tuple[dict, dict, dict]:
    """(their state dict in fp32, their inputs and outputs, metadata)."""
    with safe_open(str(FIXTURES / f"{source}_small.safetensors"), framework="pt") as f:
        metadata = {k: json.loads(v) for k, v in f.metadata().items()}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    scales = metadata["scales"]
    state = {}
    for key in (k for k in tensors if k.startswith("model.")):
        name, tensor = key.removeprefix("model."), tensors[key]
        if tensor.dtype == torch.int8:  # exact: small integers over a power of two
            tensor = tensor.float() / scales.get(name, scales["default"])
        state[name] = tensor
    return state, {k: v for k, v in tensors.items() if not k.startswith("model.")}, metadata


def save_checkpoint(source: str, state: dict, path: Path) -> Path:
    """In each source's own layout: LlamaGen's {"model": ...}, Lightning's {"state_dict": ...}."""
    torch.save({"model": state} if source == "llamagen" else {"state_dict": state, "global_step": 0}, path)
    return path


@pytest.mark.parametrize("source", ["llamagen", "taming"])
def test_a_converted_tokenizer_computes_what_the_source_model_computes(source, tmp_path):
    state, io, metadata = read_fixture(source)
    lines = []
    folder = main(["--from", source, str(save_checkpoint(source, state, tmp_path / "source.pt")),
                   "--output_dir", str(tmp_path / "converted"), "--resolution", str(metadata["resolution"])],
                  report=lines.append)
    dropped = {"llamagen": 1, "taming": sum(k.startswith("loss.") for k in state)}[source]
    assert f"{dropped} training-only tensors dropped" in lines[0] and dropped >= 1
    tok = ProVQTokenizer.from_pretrained(folder)
    assert tok.config.quantizer.l2_normalize == metadata["l2_normalize"]
    images = io["input"]
    codes = tok.encode(images)
    assert torch.equal(codes, io["codes"].long())  # the same code for every position
    with torch.no_grad():
        reconstruction = tok(images, hardness=1.0).reconstruction
        decoded = tok.decoder(tok.quantizer.decode_indices(io["codes"].long()))
    worst = {"reconstruction": (reconstruction - io["reconstruction"]).abs().max().item(),
             "decoded": (decoded - io["decoded"]).abs().max().item(),
             "decode (clamped)": (tok.decode(codes) - io["decoded"].clamp(-1, 1)).abs().max().item()}
    print(f"{source}: max |difference| from their outputs {worst}")
    assert max(worst.values()) <= 1e-5, worst


def meta_state(shapes: dict[str, list[int]]) -> dict:
    return {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}


def test_every_tensor_of_the_full_published_models_maps_onto_our_recipe():
    shapes = json.loads((FIXTURES / "full_shapes.json").read_text())
    recipe = preset_section("imagenet256", "tokenizer.model", TokenizerConfig)
    cases = {"llamagen_vq16": ("llamagen", True, recipe),
             "taming_f16_16384": ("taming", False, None)}
    for name, (source, l2, expected) in cases.items():
        state = meta_state(shapes[name])
        config = infer_config(state, source, resolution=256, l2_normalize=l2)
        if expected is not None:  # LlamaGen's VQ-16 is configs/imagenet256.yaml's tokenizer
            for field in ("base_channels", "channel_multipliers", "num_res_blocks", "latent_channels",
                          "attention", "norm_num_groups", "resolution"):
                assert getattr(config, field) == getattr(expected, field), field
            for field in ("codebook_size", "codebook_dim", "l2_normalize"):
                assert getattr(config.quantizer, field) == getattr(expected.quantizer, field), field
        else:  # taming's f16-16384: 128 x [1,1,2,2,4], z 256, 16,384 codes of 256, not l2
            assert (config.base_channels, config.channel_multipliers, config.latent_channels) == (
                128, [1, 1, 2, 2, 4], 256)
            assert (config.quantizer.codebook_size, config.quantizer.codebook_dim) == (16384, 256)
        with torch.device("meta"):
            target = ProVQTokenizer(config).state_dict()
        converted, _ = mapped_state(state, source, target)
        assert converted.keys() == target.keys()
        assert sum(v.numel() for v in converted.values()) == sum(
            t.numel() for k, t in state.items() if k != "quantize.codebook_used") + 1  # + `initialized`
        assert len(set(key_map(Layout(source, state)).values()) & set(state)) == len(state) - (source == "llamagen")


def test_missing_unknown_and_pickled_tensors_are_refused_by_name(tmp_path):
    state, _, _ = read_fixture("llamagen")
    argv = ["--from", "llamagen", str(tmp_path / "vq.pt"), "--output_dir", str(tmp_path / "out"),
            "--resolution", "32"]
    missing = {k: v for k, v in state.items() if k != "decoder.mid.1.proj_out.weight"}
    save_checkpoint("llamagen", missing, tmp_path / "vq.pt")
    with pytest.raises(FormatError, match="'decoder.mid_block.attentions.0.to_out.0.weight'.*'decoder.mid.1.proj_out"):
        main(argv)
    save_checkpoint("llamagen", {**state, "decoder.extra.weight": torch.zeros(3)}, tmp_path / "vq.pt")
    with pytest.raises(FormatError, match="'decoder.extra.weight' of the checkpoint maps to nothing"):
        main(argv)

    # LlamaGen's vq_train.py saves its argparse Namespace beside the weights: that class is let in
    torch.save({"model": state, "args": argparse.Namespace(lr=1e-4, vq_model="VQ-16")}, tmp_path / "vq.pt")
    main([*argv[:3], "--output_dir", str(tmp_path / "with_args"), "--resolution", "32"])
    assert (tmp_path / "with_args" / "model.safetensors").is_file()

    class RunsCode:
        def __reduce__(self):
            return (open, (str(tmp_path / "executed"), "w"))

    torch.save({"model": state, "payload": RunsCode()}, tmp_path / "vq.pt")
    with pytest.raises(FormatError, match="cannot be read as tensors only"):
        main(argv)
    assert not (tmp_path / "executed").exists() and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_converted_tokenizer_fine_tunes_and_evaluates(image_folder, tmp_path, capsys):
    state, _, _ = read_fixture("llamagen")
    source = save_checkpoint("llamagen", state, tmp_path / "vq.pt")
    converted = main(["--from", "llamagen", str(source), "--output_dir", str(tmp_path / "vq"),
                      "--resolution", "16"])
    from eval.__main__ import main as evaluate

    result = run_in_process(evaluate, ["rfid", "--tokenizer", str(converted), "--dataset", str(image_folder),
                                       "--split", "test", "--lpips_net", "none", "--batch_size", "8"])
    assert result["metrics"]["rfid"] > 0 and 0 < result["metrics"]["codebook_usage"] <= 1
    # Fine-tune: the run's model config must describe the same tokenizer as the folder it starts from.
    shape = dict(model__base_channels=32, model__channel_multipliers="[1,2]", model__num_res_blocks=1,
                 model__latent_channels=32, model__attention="true", model__norm_num_groups=32,
                 quantizer__codebook_size=64, quantizer__codebook_dim=8, quantizer__l2_normalize="true")
    argv = tiny_tokenizer_argv(image_folder, tmp_path / "tuned", 3, **shape) + ["--init_from", str(converted)]
    tuned = ProVQTokenizer.from_pretrained(run_in_process(train_tokenizer.main, argv))
    start = ProVQTokenizer.from_pretrained(converted)
    assert bool(tuned.quantizer.initialized)  # the published codebook is kept: no k-means init
    before = start.state_dict()
    moved = {k: (v - before[k]).abs().max().item() for k, v in tuned.state_dict().items() if v.is_floating_point()}
    assert 0 < max(moved.values()) < 0.05  # three small steps away from the published weights
    with pytest.raises(ConfigError, match="base_channels"):
        run_in_process(train_tokenizer.main, tiny_tokenizer_argv(image_folder, tmp_path / "bad", 1)
                       + ["--init_from", str(converted)])
