"""Class-conditional autoregressive prior over image codes on transformers' Llama (after LlamaGen, Sun et al. 2024)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from provq.common.cards import CardContent
from provq.common.pretrained import PretrainedMixin
from provq.common.typed_config import check_ranges

from .errors import CodeRangeError, check_fingerprint
from .positions import POSITION_EMBEDDINGS, GridRotaryEmbedding, add_output_dropout

if TYPE_CHECKING:
    from transformers import LlamaConfig


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
    attention_dropout: float = 0.0  # on the attention probabilities
    residual_dropout: float = 0.0  # on each attention block's output (LlamaGen's resid_dropout_p)
    ffn_dropout: float = 0.0  # on each feed-forward block's output (LlamaGen's ffn_dropout_p)
    token_dropout: float = 0.0  # on the input embeddings (LlamaGen's token_dropout_p)
    class_dropout: float = 0.1  # labels replaced by the null class, for classifier-free guidance
    position_embedding: str = "rope_1d"  # rope_1d: raster index | rope_2d: (row, column), LlamaGen c2i
    zero_init_head: bool = False  # the output head starts at zero (LlamaGen)
    tokenizer_fingerprint: str | None = None
    label_names: list[str] = field(default_factory=list)  # one per class, from the codes; [] = unnamed (numbers)

    def __post_init__(self) -> None:
        check_ranges(self, at_least_one=("codebook_size", "code_height", "code_width", "hidden_size", "num_layers",
                                         "num_heads", "intermediate_size"), non_negative=("num_classes",),
                     probability=("attention_dropout", "residual_dropout", "ffn_dropout", "token_dropout",
                                  "class_dropout"), prefix="PriorConfig.")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"PriorConfig.hidden_size ({self.hidden_size}) is not a multiple of "
                             f"num_heads ({self.num_heads})")
        if self.label_names and len(self.label_names) != self.num_classes:
            raise ValueError(f"PriorConfig.label_names has {len(self.label_names)} names for "
                             f"{self.num_classes} classes")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"PriorConfig.position_embedding must be one of {POSITION_EMBEDDINGS}, "
                             f"got {self.position_embedding!r}")

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


@dataclass
class PriorOutput:
    """logits: (B, N, codebook_size) over image codes only; loss: mean CE; accuracy: top-1 token accuracy."""

    logits: torch.Tensor
    loss: torch.Tensor
    accuracy: torch.Tensor


def llama_config(config: PriorConfig) -> LlamaConfig:
    """The LlamaConfig of a prior; every numeric choice is explicit so library defaults cannot drift."""
    # transformers takes seconds to import: a model being built pays for it, not every --help
    from transformers import LlamaConfig

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
        attention_dropout=config.attention_dropout,
        tie_word_embeddings=False,
        # Code 0..2 are image tokens here: Llama's text defaults (bos=1, eos=2, pad) would make
        # generate() stop early and nn.Embedding zero a padding row.
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


class ARPrior(PretrainedMixin, nn.Module):
    """Raster-order prior: input [class, code_1..code_{N-1}] predicts code_1..code_N.

    ``save_pretrained`` / ``from_pretrained`` write and read config.json + model.safetensors.
    """

    config_class = PriorConfig
    config_version = 3  # 2: one dropout field per place, position_embedding, zero_init_head; 3: label_names
    kind = "prior"  # model_type provq-ar-prior

    @classmethod
    def card_content(cls, config: PriorConfig) -> CardContent:
        classes = f"{config.num_classes} classes" if config.num_classes else "unlabelled data (one null class)"
        if config.label_names:
            shown = ", ".join(config.label_names[:10]) + (", ..." if len(config.label_names) > 10 else "")
            classes += f" ({shown})"
        return CardContent(
            title=f"ProVQ autoregressive prior ({config.num_layers} layers x {config.hidden_size}, "
                  f"{config.code_height}x{config.code_width} codes of {config.codebook_size:,})",
            task="image-generation",
            summary=[f"- A class-conditional Llama ({config.num_layers} layers, {config.num_heads} heads, "
                     f"width {config.hidden_size}, {config.position_embedding}) over raster-ordered codes; {classes}.",
                     f"- Bound to the tokenizer with fingerprint `{config.tokenizer_fingerprint}`: "
                     "`provq-sample` and `provq.load_prior` refuse any other.",
                     "- Classifier-free guidance, temperature, top-k/top-p and a KV cache at sampling time."],
            tags=["autoregressive", "image-generation", "class-conditional", "provq"],
            load=("import provq\n"
                  "tok = provq.load_tokenizer(\"<its tokenizer>\")\n"
                  "prior = provq.load_prior(\"<this folder or repo id>\", tokenizer=tok)\n"
                  "images = provq.generate(tok, prior, labels=[0, 1], seed=0)  # CFG scale 2 by default"))

    @classmethod
    def upgrade_config(cls, data: dict, version: int) -> dict:
        if version == 1 and "dropout" in data:  # 1 had one rate, on attention and embeddings
            rate = data.pop("dropout")
            data = {**data, "attention_dropout": rate, "token_dropout": rate}
        return data

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = config
        from transformers import LlamaForCausalLM

        self.llama = LlamaForCausalLM(llama_config(config))
        self.embed_dropout = nn.Dropout(config.token_dropout)
        add_output_dropout(self.llama, config.residual_dropout, config.ffn_dropout)
        if config.position_embedding == "rope_2d":
            self.llama.model.rotary_emb = GridRotaryEmbedding(self.llama.config, config.code_height,
                                                              config.code_width)
        if config.zero_init_head:
            nn.init.zeros_(self.llama.lm_head.weight)
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
        check_fingerprint(self.config.tokenizer_fingerprint, fingerprint, "this prior")
