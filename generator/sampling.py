"""KV-cached sampling from the prior with classifier-free guidance, temperature, top-k and top-p (as in LlamaGen)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from provq.common.typed_config import check_ranges

from .model import ARPrior


# The static cache writes each step in place; the dynamic one concatenates the whole cache
# every step, which for GPT-B at 256 codes made CPU sampling ~1.5x slower. Its lazy
# constructor and in-place positions are those of transformers 5 (verified on 5.24).
def new_cache(prior: ARPrior):
    """A KV cache for one sampling run: N tokens enter the model (class + N-1 codes)."""
    # imported here: transformers takes seconds to import, which a command's --help should not pay
    import transformers
    from transformers import DynamicCache, StaticCache

    if int(transformers.__version__.split(".")[0]) >= 5:
        return StaticCache(config=prior.llama.config, max_cache_len=prior.config.num_tokens)
    return DynamicCache()


# The one default of classifier-free guidance (LlamaGen samples its class-conditional priors with
# CFG): what every command, the app and the library use when no scale is given. A prior trained on
# unlabelled data has no classes to guide towards and samples with 1.
DEFAULT_CFG_SCALE = 2.0


@dataclass
class SamplingConfig:
    """How codes are drawn: classifier-free guidance, temperature, top-k and top-p (LlamaGen's knobs)."""

    cfg_scale: float | None = None  # None: DEFAULT_CFG_SCALE with classes, 1 without; 1 = plain conditional
    # sampling; 0 = unconditional
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def __post_init__(self) -> None:
        check_ranges(self, non_negative=("cfg_scale", "temperature", "top_k"))  # temperature 0: greedy; top_k 0: off
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def for_prior(config: SamplingConfig, num_classes: int) -> SamplingConfig:
    """``config`` with its scale decided for a prior of ``num_classes`` classes (None: the default)."""
    if config.cfg_scale is not None:
        return config
    return replace(config, cfg_scale=DEFAULT_CFG_SCALE if num_classes else 1.0)


def _check_labels(prior: ARPrior, labels: torch.Tensor, config: SamplingConfig) -> None:
    """Labels are classes in [0, num_classes), or -1 for "no class" (the null token: unconditional
    samples, and every sample of a prior trained on unlabelled data)."""
    if labels.dim() != 1 or labels.numel() == 0:
        raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {tuple(labels.shape)}")
    if labels.min() < -1 or labels.max() >= prior.config.num_classes:
        raise ValueError(f"labels must be -1 (no class) or in [0, {prior.config.num_classes}), got values "
                         f"in [{int(labels.min())}, {int(labels.max())}]")
    if prior.config.num_classes == 0 and config.cfg_scale != 1.0:
        raise ValueError(f"cfg_scale {config.cfg_scale} needs classes, but this prior was trained on "
                         "unlabelled data (num_classes 0): sample it with cfg_scale 1")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (the best one always stays)."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass before it already reaches top_p: the kept set is the
        # smallest prefix with mass >= top_p, and never empty.
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_tokens(logits: torch.Tensor, settings: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """One token per row: argmax at temperature 0, else an inverse-CDF draw from the filtered softmax."""
    if settings.temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits / settings.temperature, settings.top_k, settings.top_p).softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    # Exactly one uniform per row and step (unlike torch.multinomial), so the random stream is
    # the same whether the prefix is cached, recomputed or guided; scaled by the total so
    # rounding in the cumsum can never select a filtered (zero-probability) token.
    u = torch.rand(logits.shape[0], 1, generator=generator, device=generator.device)
    u = u.to(cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(logits.shape[-1] - 1)


def guide(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Rows [conditional; unconditional] -> uncond + s * (cond - uncond)."""
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + cfg_scale * (cond - uncond)


@torch.no_grad()
def sample(prior: ARPrior, labels: Sequence[int] | torch.Tensor, *, seed: int = 0, use_cache: bool = True,
           **settings) -> torch.LongTensor:
    """Sample code grids (B, h, w) for class labels (B,); the same seed gives the same codes.

    ``settings`` are SamplingConfig's fields (cfg_scale, temperature, top_k, top_p; cfg_scale unset
    or None is DEFAULT_CFG_SCALE for a class-conditional prior, 1 for one of unlabelled data). With
    cfg_scale != 1 the conditional and null-class rows run as one batch of 2B; with cfg_scale
    == 1 the null rows are skipped, so the result equals conditional sampling. use_cache=False
    recomputes the whole prefix every step (for checks and benchmarks).
    """
    config = for_prior(SamplingConfig(**settings), prior.config.num_classes)
    labels = torch.as_tensor(labels, device=prior.device).long()
    _check_labels(prior, labels, config)
    was_training = prior.training
    prior.eval()  # no dropout while sampling; restored below for in-training sample grids
    try:
        return _sample_loop(prior, labels, config, seed, use_cache)
    finally:
        prior.train(was_training)


def _sample_loop(prior: ARPrior, labels: torch.Tensor, settings: SamplingConfig, seed: int,
                 use_cache: bool) -> torch.LongTensor:
    config = prior.config
    batch = labels.shape[0]
    guided = settings.cfg_scale != 1.0
    prefix = prior.class_tokens(labels, allow_null=True)
    if guided:
        prefix = torch.cat([prefix, torch.full_like(prefix, config.null_token)])
    generator = torch.Generator(device=prior.device).manual_seed(seed)
    cache = new_cache(prior) if use_cache else None
    tokens = prefix[:, None]  # the whole sequence so far, rows [cond; uncond]
    new = tokens  # what the model has not seen yet
    codes = torch.empty(batch, config.num_tokens, dtype=torch.long, device=prior.device)
    for step in range(config.num_tokens):
        logits = prior.next_token_logits(new if use_cache else tokens, cache)
        if guided:
            logits = guide(logits, settings.cfg_scale)
        codes[:, step] = pick_tokens(logits, settings, generator)
        # Image codes are token ids 0..codebook_size-1; guided rows share the chosen code.
        new = (codes[:, step].repeat(2) if guided else codes[:, step])[:, None]
        if not use_cache:
            tokens = torch.cat([tokens, new], dim=1)
    return codes.view(batch, config.code_height, config.code_width)
