"""Class-conditional autoregressive prior over image codes on transformers' Llama (after LlamaGen, Sun et al. 2024)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from .errors import CodeRangeError, PriorFormatError, check_fingerprints

CONFIG_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_TYPE = "provq-ar-prior"


@dataclass
class PriorConfig:
    """Shape of the prior; the vocabulary is derived from codebook_size and num_classes."""

    codebook_size: int = 1024
    code_height: int = 8
    code_width: int = 8
    num_classes: int = 10
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 704
    dropout: float = 0.0
    class_dropout: float = 0.1
    tokenizer_fingerprint: str | None = None
    config_version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        positive = ("codebook_size", "code_height", "code_width", "hidden_size", "num_layers",
                    "num_heads", "intermediate_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"PriorConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 0:
            raise ValueError(f"PriorConfig.num_classes must be >= 0, got {self.num_classes}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"PriorConfig.hidden_size ({self.hidden_size}) is not a multiple of "
                             f"num_heads ({self.num_heads})")
        for name in ("dropout", "class_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"PriorConfig.{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def num_tokens(self) -> int:
        return self.code_height * self.code_width

    @property
    def null_token(self) -> int:
        # Vocabulary: [image codes | class tokens | null class], LlamaGen's layout with one prefix token.
        return self.codebook_size + self.num_classes

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + self.num_classes + 1


def _ffn_size(hidden_size: int) -> int:
    # LlamaGen's SwiGLU width: 2/3 of 4x, rounded up to a multiple of 256.
    return -(-int(8 * hidden_size / 3) // 256) * 256


PRESETS: dict[str, dict] = {
    # CPU demo: 8x8 codes of a 1,024-code tokenizer, ~3.7M parameters.
    "demo": dict(codebook_size=1024, code_height=8, code_width=8, num_classes=10,
                 hidden_size=256, num_layers=4, num_heads=4, intermediate_size=704, dropout=0.0),
    # LlamaGen GPT-B / GPT-L shapes for 16x16 codes of a 16,384-code tokenizer on ImageNet.
    "gpt_b": dict(codebook_size=16384, code_height=16, code_width=16, num_classes=1000,
                  hidden_size=768, num_layers=12, num_heads=12,
                  intermediate_size=_ffn_size(768), dropout=0.1),
    "gpt_l": dict(codebook_size=16384, code_height=16, code_width=16, num_classes=1000,
                  hidden_size=1024, num_layers=24, num_heads=16,
                  intermediate_size=_ffn_size(1024), dropout=0.1),
}


def preset(name: str, **overrides) -> PriorConfig:
    """A fresh PriorConfig for a named preset ("demo", "gpt_b", "gpt_l"), fields overridable."""
    if name not in PRESETS:
        raise ValueError(f"unknown prior preset {name!r}; choose one of {sorted(PRESETS)}")
    return PriorConfig(**{**PRESETS[name], **overrides})


@dataclass
class PriorOutput:
    """logits: (B, N, codebook_size) over image codes only; loss: mean CE; accuracy: top-1 token accuracy."""

    logits: torch.Tensor
    loss: torch.Tensor
    accuracy: torch.Tensor


def llama_config(config: PriorConfig) -> LlamaConfig:
    """The LlamaConfig of a prior; every numeric choice is explicit so library defaults cannot drift."""
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.num_tokens + 1,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        attention_dropout=config.dropout,
        tie_word_embeddings=False,
        # Code 0..2 are image tokens here: Llama's text defaults (bos=1, eos=2, pad) would make
        # generate() stop early and nn.Embedding zero a padding row.
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


class ARPrior(nn.Module):
    """Raster-order prior: input [class, code_1..code_{N-1}] predicts code_1..code_N."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = config
        self.llama = LlamaForCausalLM(llama_config(config))
        self.embed_dropout = nn.Dropout(config.dropout)  # LlamaGen's token dropout
        # transformers 5 renamed `past_key_values` to `cache`; accept both releases.
        params = inspect.signature(self.llama.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    # ---- tokens ---------------------------------------------------------------------------
    def flatten_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) or (B, N) integer codes -> (B, N) long, checked against the code grid and range."""
        c = self.config
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
        if codes.dim() == 3 and tuple(codes.shape[1:]) == (c.code_height, c.code_width):
            codes = codes.flatten(1)
        if codes.dim() != 2 or codes.shape[1] != c.num_tokens:
            raise ValueError(f"codes must be (B, {c.code_height}, {c.code_width}) or "
                             f"(B, {c.num_tokens}), got {tuple(codes.shape)}")
        codes = codes.long()
        if codes.numel() and (codes.min() < 0 or codes.max() >= c.codebook_size):
            raise CodeRangeError(f"codes must be in [0, {c.codebook_size}), got values in "
                                 f"[{int(codes.min())}, {int(codes.max())}]")
        return codes

    def class_tokens(self, labels: torch.Tensor, allow_null: bool = False) -> torch.Tensor:
        """Labels in [0, num_classes) -> class token ids; with allow_null, -1 -> the null token."""
        labels = torch.as_tensor(labels, device=self.device).long().reshape(-1)
        low = -1 if allow_null else 0
        if labels.numel() and (labels.min() < low or labels.max() >= self.config.num_classes):
            raise CodeRangeError(f"labels must be in [{low}, {self.config.num_classes}), got "
                                 f"values in [{int(labels.min())}, {int(labels.max())}]")
        return torch.where(labels < 0, self.config.null_token, labels + self.config.codebook_size)

    def drop_labels(self, tokens: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Replace class tokens by the null token with probability class_dropout (for CFG)."""
        p = self.config.class_dropout
        if not self.training or p == 0.0:
            return tokens
        if generator is None:
            # The global RNG would make the dropped labels depend on everything else that
            # drew from it, which breaks exact resume; the caller owns (and checkpoints) this one.
            raise ValueError("ARPrior in training mode with class_dropout > 0 needs a "
                             "torch.Generator: forward(codes, labels, generator=g)")
        u = torch.rand(tokens.shape[0], generator=generator, device=generator.device)
        return torch.where(u.to(tokens.device) < p, self.config.null_token, tokens)

    @property
    def device(self) -> torch.device:
        return self.llama.lm_head.weight.device

    # ---- compute --------------------------------------------------------------------------
    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # Only the image-code rows of the head: class tokens are never predicted.
        return F.linear(hidden, self.llama.lm_head.weight[: self.config.codebook_size])

    def forward(self, codes: torch.Tensor, labels: torch.Tensor,
                generator: torch.Generator | None = None) -> PriorOutput:
        """Teacher-forced pass; labels may be -1 for "no class" (unlabelled data -> null token)."""
        codes = self.flatten_codes(codes)
        class_tokens = self.drop_labels(self.class_tokens(labels, allow_null=True), generator)
        if class_tokens.shape[0] != codes.shape[0]:
            raise ValueError(f"{codes.shape[0]} code grids but {class_tokens.shape[0]} labels")
        input_ids = torch.cat([class_tokens[:, None], codes[:, :-1]], dim=1)
        embeds = self.embed_dropout(self.llama.model.embed_tokens(input_ids))
        hidden = self.llama.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
        logits = self.image_logits(hidden)
        loss = F.cross_entropy(logits.float().flatten(0, 1), codes.flatten())
        accuracy = (logits.detach().argmax(-1) == codes).float().mean()
        return PriorOutput(logits=logits, loss=loss, accuracy=accuracy)

    def next_token_logits(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        """(R, T) token ids (only the new ones when `cache` holds the prefix) -> (R, codebook_size)."""
        out = self.llama.model(input_ids=input_ids, use_cache=cache is not None,
                               **{self._cache_kwarg: cache})
        return self.image_logits(out.last_hidden_state[:, -1]).float()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def check_tokenizer(self, fingerprint: str | None) -> None:
        """Raise FingerprintMismatchError if this prior was trained for another tokenizer."""
        check_fingerprints(self.config.tokenizer_fingerprint, fingerprint, "this prior")

    # ---- files ----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json and model.safetensors (no pickle)."""
        os.makedirs(directory, exist_ok=True)
        config = {"model_type": MODEL_TYPE, **dataclasses.asdict(self.config)}
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike,
                        device: str | torch.device = "cpu") -> ARPrior:
        """Load a prior saved by save_pretrained; a hub repo id is fetched if no such folder exists."""
        directory = _resolve_folder(directory)
        model = cls(read_config(os.path.join(directory, CONFIG_NAME)))
        state = load_file(os.path.join(directory, WEIGHTS_NAME), device=str(device))
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise PriorFormatError(f"{directory}/{WEIGHTS_NAME} does not match its config: "
                                   f"missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise PriorFormatError(f"{directory}/{WEIGHTS_NAME}: tensor {name} has shape "
                                       f"{tuple(tensor.shape)}, config wants {tuple(expected[name].shape)}")
        model.load_state_dict(state)
        return model.to(device).eval()


def read_config(path: str | os.PathLike) -> PriorConfig:
    """PriorConfig from a config.json, refusing newer versions and unknown fields by name."""
    with open(path) as f:
        raw = json.load(f)
    if raw.pop("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise PriorFormatError(f"{path} is not a ProVQ prior config (model_type)")
    version = raw.get("config_version", CONFIG_VERSION)
    if not isinstance(version, int) or version > CONFIG_VERSION:
        raise PriorFormatError(f"{path} has config_version {version!r}; this code reads up to "
                               f"{CONFIG_VERSION} (upgrade provq)")
    fields = {f.name for f in dataclasses.fields(PriorConfig)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise PriorFormatError(f"{path} has unknown fields {unknown} (config_version {version})")
    # Defaults are for building new priors; a saved one must say what it is.
    missing = sorted(fields - set(raw) - {"config_version"})
    if missing:
        raise PriorFormatError(f"{path} lacks fields {missing}")
    return PriorConfig(**raw)


def _resolve_folder(name: str | os.PathLike) -> str:
    if os.path.isdir(name):
        return str(name)
    if os.path.exists(name) or str(name).count("/") != 1:
        raise FileNotFoundError(f"no prior folder at {name}")
    from huggingface_hub import snapshot_download  # only for hub ids; local use needs no network

    try:
        return snapshot_download(str(name), allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])
    except Exception as error:  # offline, unknown repo, ...: say both readings of the name
        raise FileNotFoundError(f"no prior folder at {name}, and no hub repo of that name "
                                f"could be fetched ({type(error).__name__}: {error})") from error
