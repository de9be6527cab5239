"""The lookup-free quantizer families: FSQ (Mentzer et al. 2023, arXiv 2309.15505) and LFQ (MAGVIT-v2,
Yu et al. 2023, arXiv 2310.05737). Each maps a latent to its hard code, and codes to integers and back.

Both are written to agree with vector-quantize-pytorch's `FSQ` and `LFQ` (tests/test_families.py runs
them side by side). They are our own code rather than that library's modules because the progressive
quantizer needs the continuous latent z_e and the hard code z_q apart, to mix them by the hardness;
its modules return only their straight-through output.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from provq.common.errors import ConfigError

from .codebook_init import distributed_ready

FSQ_BOUND_EPS = 1e-3  # the paper's: keeps the bounded latent strictly inside the outermost levels
MAX_LFQ_BITS = 20
# The most values (rows x codes) of one process's soft LFQ assignment held at once, 64 MiB in float32
# (autograd keeps about twice that): the batch entropy is exact over all codes up to this.
LFQ_EXACT_ENTROPY_VALUES = 2**24


def check_fsq_levels(levels: list[int] | None) -> None:
    """A ValueError unless every channel has 3 or more levels. The paper's bound centres a 2-level
    channel's split atanh(0.999) = 3.8 units off zero, so nearly every latent lands on one value (a
    degenerate channel); vector-quantize-pytorch refuses it too unless its symmetric variant is on."""
    if not levels or any(level < 3 for level in levels):
        raise ValueError(f"quantizer.levels must list at least one level count >= 3 per channel, got {levels} "
                         "(a level of 2 is a degenerate channel under FSQ's bound; for one bit per channel "
                         "use kind lfq)")


class FiniteScalarCodes:
    """FSQ: each channel bounded by tanh and rounded to one of `levels[i]` values in [-1, 1].

    The continuous latent z_e is the bounded, rescaled channel (before rounding), so h = 0 gives the
    decoder exactly what FSQ would round. Index = sum_i level_i * prod_{j<i} levels_j (the first
    channel is the least significant digit, as in the paper's code and vector-quantize-pytorch).
    """

    def __init__(self, levels: list[int]) -> None:
        check_fsq_levels(levels)
        self.levels = list(levels)
        self.dim = len(self.levels)
        self.num_codes = math.prod(self.levels)

    def _constants(self, device) -> tuple[torch.Tensor, ...]:
        levels = torch.tensor(self.levels, dtype=torch.float32, device=device)
        half_width = torch.div(levels, 2, rounding_mode="floor")
        basis = torch.tensor([math.prod(self.levels[:i]) for i in range(self.dim)], device=device)
        return levels, half_width, basis

    def latent(self, rows: torch.Tensor) -> torch.Tensor:
        """tanh-bounded channels scaled so that the code values are {-1, ..., 1} (even levels: -1 to
        1 - 2/L): the paper's `bound`, divided by the half width."""
        levels, half_width, _ = self._constants(rows.device)
        half_l = (levels - 1) * (1 + FSQ_BOUND_EPS) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return (torch.tanh(rows + shift) * half_l - offset) / half_width

    def quantize(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, half_width, basis = self._constants(z_e.device)
        z_q = torch.round(z_e * half_width) / half_width
        digits = (z_q * half_width + half_width).round().long()
        return z_q, (digits * basis).sum(-1)

    def vectors(self, indices: torch.Tensor) -> torch.Tensor:
        levels, half_width, basis = self._constants(indices.device)
        digits = torch.div(indices.unsqueeze(-1), basis, rounding_mode="floor") % levels.long()
        return (digits.float() - half_width) / half_width

    def all_vectors(self, device="cpu") -> torch.Tensor:
        return self.vectors(torch.arange(self.num_codes, device=device))


class BinaryCodes:
    """LFQ: each channel's sign is a bit, the code is the vector of +-1; index bits most significant
    first (vector-quantize-pytorch's order). The continuous latent z_e is the projected latent."""

    def __init__(self, bits: int) -> None:
        self.dim = bits
        self.num_codes = 2**bits

    def _weights(self, device) -> torch.Tensor:
        return 2 ** torch.arange(self.dim - 1, -1, -1, device=device)

    def latent(self, rows: torch.Tensor) -> torch.Tensor:
        return rows

    def quantize(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positive = z_e > 0
        z_q = torch.where(positive, 1.0, -1.0).to(z_e.dtype)
        return z_q, (positive.long() * self._weights(z_e.device)).sum(-1)

    def vectors(self, indices: torch.Tensor) -> torch.Tensor:
        bits = torch.bitwise_and(indices.unsqueeze(-1), self._weights(indices.device)) != 0
        return bits.float() * 2 - 1

    def all_vectors(self, device="cpu") -> torch.Tensor:
        return self.vectors(torch.arange(self.num_codes, device=device))


def _binary_entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log() + (1 - p) * (1 - p).clamp_min(1e-12).log())


def _group_joint_probs(bit_probs: torch.Tensor) -> torch.Tensor:
    """(N, G) probabilities that each of G independent bits is 1 -> (N, 2^G) joint probabilities,
    codes ordered with the first bit most significant."""
    joint = torch.ones(bit_probs.shape[0], 1, dtype=bit_probs.dtype, device=bit_probs.device)
    for g in range(bit_probs.shape[1]):
        p = bit_probs[:, g : g + 1]
        joint = torch.stack([joint * (1 - p), joint * p], dim=-1).flatten(1)
    return joint


class LFQEntropy(NamedTuple):
    per_sample: torch.Tensor  # mean over rows of each row's entropy (exact at any number of bits)
    batch: torch.Tensor  # entropy of the batch-average assignment (exact, or the grouped approximation)
    exact: bool  # the batch entropy is over all 2^bits codes (False: summed over groups of bits)


def batch_entropy_group_bits(bits: int, rows: int, group_bits: int) -> int:
    """Bits per group of LFQ's batch entropy for `rows` rows per process: all of them (exact) when the
    rows x 2^bits soft assignment fits LFQ_EXACT_ENTROPY_VALUES, else `group_bits` (the approximation);
    a ConfigError, before anything is allocated, when even a group does not fit."""
    if rows * 2**bits <= LFQ_EXACT_ENTROPY_VALUES:
        return bits
    group = min(group_bits, bits)
    if rows * 2**group > LFQ_EXACT_ENTROPY_VALUES:
        raise ConfigError(f"quantizer.entropy_group_bits {group_bits}: LFQ's batch entropy over groups of {group} "
                          f"bits holds {rows} rows x 2^{group} = {rows * 2**group:,} values per process, over the "
                          f"bound of {LFQ_EXACT_ENTROPY_VALUES:,}; lower entropy_group_bits (or the batch)")
    return group


def _max_over_processes(count: int, device) -> int:
    # Every process must take the same branch (their collectives differ): decide on the largest batch.
    if not distributed_ready() or dist.get_world_size() == 1:
        return count
    value = torch.tensor([count], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def lfq_entropy_terms(z_e: torch.Tensor, inverse_temperature: float, group_bits: int) -> LFQEntropy:
    """MAGVIT-v2's entropy terms of the soft code assignment q(c | z) = softmax(-||z - c||^2 / tau).

    With codes in {-1, 1}^bits the assignment factorizes over bits (q(bit_d = 1) = sigmoid(4 z_d / tau)),
    so the per-sample entropy is exactly the sum of the bits' entropies, at any number of bits. The
    batch average does not factorize: it is computed exactly over all 2^bits codes wherever rows x 2^bits
    fits LFQ_EXACT_ENTROPY_VALUES (vector-quantize-pytorch's LFQ always sums over every code). Beyond,
    it is this project's grouped approximation: the exact entropies of groups of `group_bits` bits,
    summed, an upper bound (subadditivity) blind to redundancy between groups. The batch average is
    taken over every process's rows, with gradients, as under DDP.
    """
    rows = z_e.reshape(-1, z_e.shape[-1]).float()
    bits = rows.shape[-1]
    group = batch_entropy_group_bits(bits, _max_over_processes(rows.shape[0], rows.device), group_bits)
    bit_probs = torch.sigmoid(4 * inverse_temperature * rows)
    per_sample = _binary_entropy(bit_probs).sum(-1).mean()
    batch = rows.new_zeros(())
    for part in bit_probs.split(group, dim=-1):
        average = _group_joint_probs(part).mean(0)
        if distributed_ready() and dist.get_world_size() > 1:
            average = dist_fn.all_reduce(average) / dist.get_world_size()
        batch = batch - (average * average.clamp_min(1e-12).log()).sum()
    return LFQEntropy(per_sample, batch, exact=group == bits)
