"""Soft assignment to a codebook, its temperature annealed by the hardness: soft-to-hard vector
quantization (Agustsson et al., NeurIPS 2017) and the Gumbel-softmax relaxation (Jang et al., ICLR
2017) that DALL-E's discrete VAE anneals (Ramesh et al., ICML 2021).

Each latent row z gets the codebook mixture sum_k w_k c_k with w = softmax(-||z - c_k||^2 / tau)
(`soft`), or w = softmax(-||z - c_k||^2 / tau + g_k), g_k ~ Gumbel(0, 1) (`gumbel`: argmax w is a
sample of the categorical softmax(-||z - c||^2 / tau), and w its relaxation at temperature 1). tau is
in units of squared distance in code space: with l2 codes ||z - c||^2 = 2 - 2 cos(z, c) is in [0, 4].

How the quantizer uses it (tokenizer/quantizer.py, mechanisms `soft` and `gumbel`, vq only):
- h = 0: the decoder gets the mixture at `soft_temperature_start`, from the first step, as in the
  soft-to-hard methods (not z_e, as the other mechanisms give): every code learns from every
  latent through the decoder's gradient. With l2 codes and tau = 1 the mixture keeps z_e's
  direction (cosine ~0.98 with 1,024 random codes in 8 dimensions) at about a quarter of its norm.
- 0 < h < 1: the mixture at tau(h), log-linear down to `soft_temperature_end` (1e-3: within ~0.01
  of the nearest code with l2 codes, so the step to h = 1 is small).
- h = 1: exactly hard VQ (the straight-through z_e + sg(z_q - z_e)); exported tokenizers and
  evaluation are plain VQ.
- l2 codes: the mixture is not renormalized. It is a convex combination of unit codes, inside the
  ball as interpolate's (1 - h) z_e + h z_q is; its norm says how peaked the assignment is, and
  renormalizing a broad mixture would hand the decoder z_e's direction back. The default
  temperatures are set for l2 codes; raw codes start at +-1/K (taming's init), nearly equidistant
  from every latent, so their mixture is about their mean until the codes spread or k-means
  places them.
- Losses: the hard ones for every mechanism, the nearest code's codebook loss and commitment,
  weighted by omega(h). The soft codebook loss sum_k w_k ||sg(z_e) - c_k||^2 is deterministic
  annealing's update (Rose 1998): above a critical temperature (twice the latents' largest
  variance) it pulls every code to the latents' mean, which would undo the k-means init; the
  decoder's gradient already reaches every code. So `soft` differs from `interpolate` in what the
  decoder sees only, as an ablation needs. The k-means init runs as for every mechanism, when h
  first leaves 0, and replaces the codebook the warm-up shaped.

The (rows x codes) weights are computed in chunks of rows, forward and backward: the backward pass
recomputes each chunk's weights (and its Gumbel noise, from a per-chunk seed), so no (rows x codes)
matrix outlives its chunk. ImageNet-256's 16,384 codes and 4,096 rows per process would otherwise
keep several 268 MB matrices alive until the backward pass.
"""
from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

SOFT_MECHANISMS = ("soft", "gumbel")
# Rows x codes per chunk: one float32 (rows x codes) matrix of a chunk is 16 MiB.
CHUNK_ELEMENTS = 2**22
_SEED_BOUND = 2**62


def annealed_temperature(hardness: float, start: float, end: float) -> float:
    """tau(h) = start^(1 - h) * end^h: log-linear in h, `start` at h = 0 and `end` as h -> 1 (the
    quantizer takes hard codes at h = 1 itself). Geometric, since what matters is the ratio of the
    distance gaps to tau, over the decades a run anneals through."""
    return math.exp((1.0 - hardness) * math.log(start) + hardness * math.log(end))


def codebook_mixture(
    rows: torch.Tensor,
    codes: torch.Tensor,
    temperature: float,
    generator: torch.Generator | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """(N, D) rows -> (N, D): sum_k w_k c_k, w the soft assignment of each row to the (K, D) codes.

    With a `generator`, Gumbel noise is added to the logits (mechanism `gumbel`); the noise of
    each chunk comes from a seed drawn from the generator, so it depends on the generator and the
    chunking (`chunk_rows`, by default a function of K alone). Gradients reach the rows and every
    code (through the weights and through the mixture itself); there is no double backward.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    chunk = chunk_rows or max(1, CHUNK_ELEMENTS // codes.shape[0])
    seeds = None
    if generator is not None:
        count = max(1, math.ceil(rows.shape[0] / chunk))
        seeds = torch.randint(_SEED_BOUND, (count,), generator=generator, device=generator.device).tolist()
    return _CodebookMixture.apply(rows, codes, float(temperature), chunk, seeds)


def _chunk_weights(
    rows: torch.Tensor, codes: torch.Tensor, codes_sq: torch.Tensor, temperature: float, seed: int | None
) -> torch.Tensor:
    """softmax over codes of -||z - c||^2 / tau (+ Gumbel noise from `seed`) for one chunk of rows."""
    # ||z||^2 is the same for every code of a row, so it leaves the softmax unchanged: drop it.
    logits = torch.addmm(codes_sq, rows, codes.t(), beta=-1.0 / temperature, alpha=2.0 / temperature)
    if seed is not None:
        noise = torch.Generator(device=rows.device).manual_seed(seed)
        # Gumbel(0, 1) = -log(E), E = -log(U) ~ Exp(1): from uniforms, several times faster on a CPU
        # than Tensor.exponential_ (torch.nn.functional.gumbel_softmax's draw, the tests' oracle).
        uniform = torch.rand(logits.shape, generator=noise, device=rows.device, dtype=logits.dtype)
        logits.sub_(uniform.clamp_min_(torch.finfo(logits.dtype).tiny).log_().neg_().log_())
    return torch.softmax(logits, dim=1)


def _seed(seeds: list[int] | None, chunk: int) -> int | None:
    return None if seeds is None else seeds[chunk]


class _CodebookMixture(torch.autograd.Function):
    """y = w @ codes with w = softmax(logits), logits = (2 z.c - ||c||^2) / tau (+ noise), by chunks.

    Written out rather than torch.utils.checkpoint per chunk: checkpointing would rebuild each
    chunk's autograd graph (logits, softmax, matmul and their saved tensors) in the backward
    pass; here a chunk needs its weights and one more (rows x codes) matrix. With s = dL/dlogits
    = w * (g.c_k - g.y) (g = dL/dy), dL/dz = (2 / tau) s @ codes (sum_k s_k = 0 removes the
    ||z||^2 term) and dL/dc_k = sum_n w_nk g_n + (2 / tau) sum_n s_nk (z_n - c_k).
    """

    @staticmethod
    def forward(ctx, rows, codes, temperature, chunk, seeds):
        codes_sq = codes.pow(2).sum(1)
        parts = rows.split(chunk)
        mixed, ctx.kept = [], None
        for i, part in enumerate(parts):
            weights = _chunk_weights(part, codes, codes_sq, temperature, _seed(seeds, i))
            mixed.append(weights @ codes)
            if len(parts) == 1:  # one chunk keeps its weights (at most CHUNK_ELEMENTS): no recompute
                ctx.kept = weights
            del weights  # before the next chunk's: one chunk's weights alive at a time
        out = torch.cat(mixed) if mixed else rows.new_zeros(0, codes.shape[1])
        ctx.save_for_backward(rows, codes, out)
        ctx.temperature, ctx.chunk, ctx.seeds = temperature, chunk, seeds
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        rows, codes, out = ctx.saved_tensors
        scale = 2.0 / ctx.temperature
        codes_sq = codes.pow(2).sum(1)
        grad_rows = torch.empty_like(rows) if ctx.needs_input_grad[0] else None
        grad_codes = torch.zeros_like(codes) if ctx.needs_input_grad[1] else None
        start = 0
        for i, (part, grad, mixed) in enumerate(zip(rows.split(ctx.chunk), grad_out.split(ctx.chunk),
                                                    out.split(ctx.chunk), strict=True)):
            weights = ctx.kept if ctx.kept is not None else _chunk_weights(
                part, codes, codes_sq, ctx.temperature, _seed(ctx.seeds, i))
            # (A^T B computed as (B^T A)^T: a CPU matmul with the long side transposed is ~10x slower.)
            if grad_codes is not None:
                grad_codes.add_((grad.t() @ weights).t())  # the mixture's own path: sum_n w_nk g_n
            # s = w * (g.c_k - g.y), in place over the weights (no third matrix)
            slopes = weights.mul_((grad @ codes.t()).sub_((grad * mixed).sum(1, keepdim=True)))
            if grad_rows is not None:
                grad_rows[start : start + part.shape[0]] = (slopes @ codes).mul_(scale)
            if grad_codes is not None:
                grad_codes.add_((part.t() @ slopes).t() - slopes.sum(0).unsqueeze(1) * codes, alpha=scale)
            start += part.shape[0]
        ctx.kept = None
        return grad_rows, grad_codes, None, None, None
