"""Published VQ tokenizers in: LlamaGen's VQ models and taming-transformers' VQGANs as ProVQTokenizer folders.

    python -m tokenizer.convert --from llamagen vq_ds16_c2i.pt --output_dir runs/llamagen_vq16
    python -m tokenizer.convert --from taming last.ckpt --output_dir runs/taming_f16_16384

The architectures are the same up to names (a diffusers VAE encoder/decoder, a 1x1 projection into
the codebook, nearest-code lookup, the projection back): the converted tokenizer reconstructs
exactly what the source model does (tests/test_convert.py runs it against their code's outputs).
The shapes are read from the tensors; the resolution (not stored) and l2 codes (LlamaGen: yes,
taming: no) come from flags. A tensor that maps nowhere, or a missing one, is an error that names
it; the training-only tensors (taming's loss/discriminator, LlamaGen's usage buffer) are dropped
and counted. Files are read with torch.load(weights_only=True) only: nothing is unpickled.
"""

from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import torch

from provq.common.cli import CommandParser
from provq.common.errors import FormatError, MissingFileError

from .model import ProVQTokenizer, TokenizerConfig
from .quantizer import QuantizerConfig
from .schedule import ScheduleConfig

SOURCES = ("llamagen", "taming")
# Tensors of the source models that only training uses: dropped, and counted in the report.
DROPPED = {"llamagen": re.compile(r"^quantize\.codebook_used$"), "taming": re.compile(r"^loss\.")}


def load_checkpoint(path: str | Path, source: str) -> dict[str, torch.Tensor]:
    """The model's tensors: LlamaGen's "ema" (as its demo prefers) or "model", taming's "state_dict"."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise FormatError(f"{path} is empty: not a checkpoint")
    try:
        # LlamaGen's training script stores its argparse Namespace beside the weights: that class,
        # and nothing else, is allowed in (a Namespace only holds values; building it runs no code).
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # an object beyond tensors and containers
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise FormatError(
            f"{path} cannot be read as tensors only ({first}); objects in it would have to be unpickled, "
            "which runs code from the file. Where you trust it, save just its state dict: "
            "torch.save(torch.load(path)['model' or 'state_dict'], 'weights.pt')"
        ) from None
    except Exception as error:  # torch's reader on a cut zip, EOFError on a cut legacy file, ...
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise FormatError(f"{path} is not a complete torch checkpoint ({type(error).__name__}: {first}): "
                          "it may be truncated, or another kind of file") from None
    if not isinstance(checkpoint, dict):
        raise FormatError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dictionary")
    for key in ("ema", "model", "state_dict") if source == "llamagen" else ("state_dict",):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    state = {k.removeprefix("module."): v for k, v in checkpoint.items() if torch.is_tensor(v)}
    if not state:
        raise FormatError(f"{path} holds no tensors under 'ema', 'model' or 'state_dict'")
    return state


def _levels(state: dict, pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


class Layout:
    """Where one source keeps its encoder and decoder pieces: key prefixes by role."""

    def __init__(self, source: str, state: dict):
        self.source = source
        if source == "llamagen":
            self.enc_level, self.enc_res, self.enc_attn = "encoder.conv_blocks.{i}", ".res.{j}", ".attn.{j}"
            self.dec_level, self.dec_res, self.dec_attn = "decoder.conv_blocks.{i}", ".res.{j}", ".attn.{j}"
            self.down, self.up = ".downsample.conv", ".upsample.conv"
            self.mid = ("mid.0", "mid.1", "mid.2")
            self.shortcut = "nin_shortcut"
        else:
            self.enc_level, self.enc_res, self.enc_attn = "encoder.down.{i}", ".block.{j}", ".attn.{j}"
            self.dec_level, self.dec_res, self.dec_attn = "decoder.up.{i}", ".block.{j}", ".attn.{j}"
            self.down, self.up = ".downsample.conv", ".upsample.conv"
            self.mid = ("mid.block_1", "mid.attn_1", "mid.block_2")
            self.shortcut = "nin_shortcut"
        level = self.enc_level.split("{")[0].replace(".", r"\.")
        self.levels = _levels(state, rf"^{level}(\d+)\.")
        res = (self.enc_level + self.enc_res).format(i=0, j="").replace(".", r"\.")
        self.res_blocks = _levels(state, rf"^{res}(\d+)\.")

    def decoder_level(self, k: int) -> int:
        """Source index of diffusers' up block k (k = 0 is the lowest resolution)."""
        return k if self.source == "llamagen" else self.levels - 1 - k


def infer_config(state: dict, source: str, resolution: int, l2_normalize: bool,
                 norm_num_groups: int = 32) -> TokenizerConfig:
    """The TokenizerConfig the tensors describe; resolution, l2 and groups are not stored in them."""
    layout = Layout(source, state)
    if not layout.levels or not layout.res_blocks:
        raise FormatError(f"these tensors are not a {source} VQ model (no encoder levels found)")
    base = state["encoder.conv_in.weight"].shape[0]
    outs = [state[(layout.enc_level + layout.enc_res).format(i=i, j=layout.res_blocks - 1) + ".conv2.weight"]
            .shape[0] for i in range(layout.levels)]
    codebook = state["quantize.embedding.weight"]
    last = layout.enc_level.format(i=layout.levels - 1) + layout.enc_attn.format(j=0) + ".q.weight"
    return TokenizerConfig(
        resolution=resolution, base_channels=base, channel_multipliers=[o // base for o in outs],
        num_res_blocks=layout.res_blocks, latent_channels=state["encoder.conv_out.weight"].shape[0],
        attention=last in state, norm_num_groups=norm_num_groups,
        quantizer=QuantizerConfig(codebook_size=codebook.shape[0], codebook_dim=codebook.shape[1],
                                  l2_normalize=l2_normalize, kmeans_init=False,
                                  schedule=ScheduleConfig(kind="none")),
    )


def _resnet(ours: str, theirs: str, shortcut: str) -> dict[str, str]:
    names = {f"{ours}.{n}.{p}": f"{theirs}.{n}.{p}" for n in ("norm1", "conv1", "norm2", "conv2")
             for p in ("weight", "bias")}
    names.update({f"{ours}.conv_shortcut.{p}": f"{theirs}.{shortcut}.{p}" for p in ("weight", "bias")})
    return names


def _attention(ours: str, theirs: str) -> dict[str, str]:
    names = {f"{ours}.group_norm.{p}": f"{theirs}.norm.{p}" for p in ("weight", "bias")}
    for mine, source in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
        names.update({f"{ours}.{mine}.{p}": f"{theirs}.{source}.{p}" for p in ("weight", "bias")})
    return names


def key_map(layout: Layout) -> dict[str, str]:
    """Our state-dict key -> the source's, for every tensor a converted tokenizer can have."""
    names = {f"{part}.{p}": f"{part}.{p}" for part in ("encoder.conv_in", "encoder.conv_out",
                                                       "decoder.conv_in", "decoder.conv_out")
             for p in ("weight", "bias")}
    for side in ("encoder", "decoder"):
        names.update({f"{side}.conv_norm_out.{p}": f"{side}.norm_out.{p}" for p in ("weight", "bias")})
        first, attn, second = layout.mid
        names.update(_resnet(f"{side}.mid_block.resnets.0", f"{side}.{first}", layout.shortcut))
        names.update(_attention(f"{side}.mid_block.attentions.0", f"{side}.{attn}"))
        names.update(_resnet(f"{side}.mid_block.resnets.1", f"{side}.{second}", layout.shortcut))
    for i in range(layout.levels):
        theirs = layout.enc_level.format(i=i)
        for j in range(layout.res_blocks):
            names.update(_resnet(f"encoder.down_blocks.{i}.resnets.{j}", theirs + layout.enc_res.format(j=j),
                                 layout.shortcut))
            names.update(_attention(f"encoder.down_blocks.{i}.attentions.{j}", theirs + layout.enc_attn.format(j=j)))
        names.update({f"encoder.down_blocks.{i}.downsamplers.0.conv.{p}": f"{theirs}{layout.down}.{p}"
                      for p in ("weight", "bias")})
        theirs = layout.dec_level.format(i=layout.decoder_level(i))
        for j in range(layout.res_blocks + 1):
            names.update(_resnet(f"decoder.up_blocks.{i}.resnets.{j}", theirs + layout.dec_res.format(j=j),
                                 layout.shortcut))
            names.update(_attention(f"decoder.up_blocks.{i}.attentions.{j}", theirs + layout.dec_attn.format(j=j)))
        names.update({f"decoder.up_blocks.{i}.upsamplers.0.conv.{p}": f"{theirs}{layout.up}.{p}"
                      for p in ("weight", "bias")})
    names.update({"quantizer.codebook.weight": "quantize.embedding.weight"})
    names.update({f"quantizer.proj_in.{p}": f"quant_conv.{p}" for p in ("weight", "bias")})
    names.update({f"quantizer.proj_out.{p}": f"post_quant_conv.{p}" for p in ("weight", "bias")})
    return names


def mapped_state(state: dict, source: str, target: dict) -> tuple[dict, int]:
    """The source's tensors under our names and shapes (``target``: a ProVQTokenizer's state dict),
    and how many training-only tensors were dropped. Works on meta tensors too: shapes only."""
    names = key_map(Layout(source, state))
    dropped = {k for k in state if DROPPED[source].match(k)}
    used, converted = set(), {}
    for ours, want in target.items():
        if ours == "quantizer.initialized":
            converted[ours] = torch.ones_like(want)  # trained codes: no k-means init
            continue
        theirs = names.get(ours)
        if theirs is None or theirs not in state:
            raise FormatError(f"the checkpoint has no tensor for {ours!r} (looked for {theirs!r}): not a {source} "
                              "model of the shape its other tensors describe")
        tensor = state[theirs]
        if tensor.dim() == 4 and want.dim() == 2:  # a 1x1 convolution as a linear layer
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])
        if tensor.shape != want.shape:
            raise FormatError(f"tensor {theirs!r} has shape {tuple(tensor.shape)}, {ours!r} needs {tuple(want.shape)}")
        converted[ours] = tensor.to(want.dtype)
        used.add(theirs)
    unmapped = sorted(set(state) - used - dropped)
    if unmapped:
        raise FormatError(f"tensor {unmapped[0]!r} of the checkpoint maps to nothing in a ProVQTokenizer "
                          f"({len(unmapped)} such tensors): a layer this converter does not know")
    return converted, len(dropped)


def convert_state(state: dict, source: str, config: TokenizerConfig) -> tuple[ProVQTokenizer, int]:
    """A ProVQTokenizer holding the source's tensors, and how many training-only tensors were dropped."""
    model = ProVQTokenizer(config)
    converted, dropped = mapped_state(state, source, model.state_dict())
    model.load_state_dict(converted, strict=True)
    return model.eval(), dropped


def convert(checkpoint: str | Path, source: str, resolution: int = 256, l2_normalize: bool | None = None,
            norm_num_groups: int = 32) -> tuple[ProVQTokenizer, int]:
    """Load and convert one checkpoint; l2 codes default to the source's (LlamaGen yes, taming no)."""
    if source not in SOURCES:
        raise FormatError(f"--from must be one of {SOURCES}, not {source!r}")
    state = load_checkpoint(checkpoint, source)
    l2 = (source == "llamagen") if l2_normalize is None else l2_normalize
    return convert_state(state, source, infer_config(state, source, resolution, l2, norm_num_groups))


def _flag(text: str) -> bool:
    return {"true": True, "false": False}[text.lower()]


def main(argv: list[str] | None = None, report: Callable[[str], None] = print) -> Path:
    parser = CommandParser(prog="python -m tokenizer.convert", description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", required=True, choices=SOURCES)
    parser.add_argument("checkpoint", help="LlamaGen .pt (model/ema) or taming .ckpt (state_dict)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--resolution", type=int, default=256, help="image size the model was trained at")
    parser.add_argument("--l2_normalize", type=_flag, default=None, help="true|false; default: the source's")
    parser.add_argument("--norm_num_groups", type=int, default=32, help="GroupNorm groups (both sources: 32)")
    args = parser.parse_args(argv)
    model, dropped = convert(args.checkpoint, args.source, args.resolution, args.l2_normalize,
                             args.norm_num_groups)
    folder = model.save_pretrained(args.output_dir)
    c = model.config
    report(f"{args.source} -> {folder}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
           f"ch {c.base_channels} x {c.channel_multipliers}, {c.num_res_blocks} res blocks, z {c.latent_channels}, "
           f"{c.quantizer.codebook_size} codes of dim {c.quantizer.codebook_dim}"
           f"{' (l2)' if c.quantizer.l2_normalize else ''}; {dropped} training-only tensors dropped")
    return folder


def entry() -> None:
    """The console command (``provq-...``) and ``python -m``."""
    from provq.common.cli import command_name, run_command

    run_command(command_name("python -m tokenizer.convert"), main)


if __name__ == "__main__":
    entry()
