"""The remedies for codebook collapse users reach for, as options of the progressive quantizer (vq only):
an EMA codebook (VQ-VAE, van den Oord et al. 2017, arXiv 1711.00937), dead-code restart (Jukebox, Dhariwal
et al. 2020, arXiv 2005.00341), the rotation trick (Fifty et al. 2024, arXiv 2410.06424) and SimVQ (Zhu et
al. 2024, arXiv 2411.02038).

vector-quantize-pytorch ships all four; tests/test_remedies.py runs it beside these on the same tensors.
Ours are written out here, not taken from it, because its modules fuse the lookup, the update and the
straight-through into one forward, while the progressive quantizer needs z_e and z_q apart to mix them
by the hardness.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from provq.common.typed_config import check_ranges

from .codebook_init import all_gather_rows, distributed_ready

LAPLACE_EPS = 1e-5  # additive smoothing of the EMA counts (vector-quantize-pytorch's eps)
NORM_EPS = 1e-6  # the smallest norm the rotation trick divides by (vector-quantize-pytorch's)
REMEDY_FIELDS = {"ema_codebook": False, "dead_code_threshold": 0.0, "rotation_trick": False, "simvq": False}


def check_remedies(config) -> None:
    """The remedy fields of a resolved QuantizerConfig: ranges, family, and the combinations that hold."""
    check_ranges(config, fraction=("codebook_ema_decay",), non_negative=("dead_code_threshold",))
    chosen = [name for name, off in REMEDY_FIELDS.items() if getattr(config, name) != off]
    if config.kind != "vq" and chosen:
        raise ValueError(f"quantizer.{chosen[0]} applies to kind vq only ({config.kind} has no codebook)")
    if config.simvq:
        if config.kmeans_init:
            raise ValueError("quantizer.kmeans_init does not apply with simvq: its codes are a frozen random "
                             "basis times a learned map, which k-means centroids cannot set (set kmeans_init false)")
        for name in ("ema_codebook", "dead_code_threshold"):
            if name in chosen:
                raise ValueError(f"quantizer.{name} does not apply with simvq: it writes codes directly, "
                                 "while SimVQ's are the learned map of a frozen basis")


def make_codebook(config, dim: int) -> nn.Module:
    """vq's codebook, whose `weight` (codebook_size, dim) holds the codes: SimVQ's implicit one, or a
    table, trained by its loss or written by the EMA (then out of the optimizer and of DDP's sync; the
    all-reduced statistics keep it the same on every process)."""
    if config.simvq:
        return SimVQCodebook(config.codebook_size, dim)
    codebook = nn.Embedding(config.codebook_size, dim)
    bound = 1.0 / config.codebook_size  # taming-transformers / LlamaGen init
    nn.init.uniform_(codebook.weight, -bound, bound)
    codebook.weight.requires_grad_(not config.ema_codebook)
    return codebook


class SimVQCodebook(nn.Module):
    """SimVQ's implicit codebook: a frozen random basis (codebook_size, dim) times one learned linear map.

    `weight` is the codebook, like nn.Embedding's, so lookups, the codebook loss (which trains the map)
    and decoding are the plain codebook's. The basis is a persistent buffer: decoding needs it.
    """

    def __init__(self, codebook_size: int, dim: int) -> None:
        super().__init__()
        # The paper's and vector-quantize-pytorch's initialization: Gaussian, variance 1 / dim.
        self.register_buffer("basis", torch.randn(codebook_size, dim) * dim**-0.5)
        self.map = nn.Linear(dim, dim, bias=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.map(self.basis)


def rotation_trick(z_e: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """The value exactly z_q; the gradient to z_e through the rotation and rescaling that map z_e onto
    z_q, both held constant (Fifty et al. 2024, section 4.2), instead of the straight-through identity.

    vector-quantize-pytorch's `rotate_to` returns the rotated vector itself, z_q up to rounding; here
    the rotation adds an exact zero to z_q, so hard codes stay bitwise the codebook's.
    """
    q = z_q.detach()
    norm_e, norm_q = z_e.detach().norm(dim=-1, keepdim=True), q.norm(dim=-1, keepdim=True)
    u = z_e.detach() / norm_e.clamp_min(NORM_EPS)
    q_hat = q / norm_q.clamp_min(NORM_EPS)
    w = F.normalize(u + q_hat, dim=-1, eps=NORM_EPS)  # the Householder direction: (I - 2ww^T) u = -q_hat
    rotated = (z_e - 2 * (z_e * w).sum(-1, keepdim=True) * w + 2 * (z_e * u).sum(-1, keepdim=True) * q_hat)
    mapped = rotated * (norm_q / norm_e.clamp_min(NORM_EPS))
    return q + (mapped - mapped.detach())


class CodeUseEMA(nn.Module):
    """Training state of the EMA codebook and of dead-code restart: per code, an EMA of how many rows
    a training call (all processes' micro-batches together) assigns it and, for the EMA codebook, of
    their sum. Non-persistent buffers: the trainer checkpoints them (training.NonPersistentBuffers), the
    export leaves them out. Updates all-reduce the batch's counts and sums, so every process holds
    the same state and the same codebook.
    """

    def __init__(self, codebook_size: int, dim: int, track_sums: bool) -> None:
        super().__init__()
        self.register_buffer("code_use", torch.ones(codebook_size), persistent=False)
        if track_sums:
            self.register_buffer("code_sum", torch.zeros(codebook_size, dim), persistent=False)
        else:
            self.code_sum = None
        # False until the state holds the current codebook: at the first update, after a k-means init,
        # and for weights loaded from elsewhere (--init_from), whose codebook the state must start from.
        self.register_buffer("ready", torch.tensor(False), persistent=False)
        self.register_buffer("restarts", torch.tensor(0), persistent=False)  # codes restarted, all time

    @torch.no_grad()
    def start(self, codes: torch.Tensor) -> None:
        """The state of a codebook just set: each code counted once, at itself (vector-quantize-pytorch's
        start: cluster_size ones, embed_avg the codes)."""
        self.code_use.fill_(1.0)
        if self.code_sum is not None:
            self.code_sum.copy_(codes)
        self.ready.fill_(True)

    @torch.no_grad()
    def update(self, rows: torch.Tensor, indices: torch.Tensor, decay: float) -> None:
        """One EMA step with the (N, dim) rows of this process and their code indices (N,)."""
        size = self.code_use.shape[0]
        packed = torch.bincount(indices, minlength=size).to(rows.dtype).unsqueeze(1)
        if self.code_sum is not None:
            sums = torch.zeros(size, rows.shape[1], dtype=rows.dtype, device=rows.device).index_add_(0, indices, rows)
            packed = torch.cat([packed, sums], dim=1)
        if distributed_ready():
            dist.all_reduce(packed)  # one collective: the global batch's counts and sums
        self.code_use.lerp_(packed[:, 0], 1.0 - decay)
        if self.code_sum is not None:
            self.code_sum.lerp_(packed[:, 1:], 1.0 - decay)

    def codes(self, l2_normalize: bool) -> torch.Tensor:
        """The EMA codebook: each code's sum over its Laplace-smoothed count, which keeps a code no row
        has reached away from a division by zero (normalized for l2 codes, as the cosine codebook)."""
        total = self.code_use.sum()
        smoothed = (self.code_use + LAPLACE_EPS) / (total + self.code_use.shape[0] * LAPLACE_EPS) * total
        codes = self.code_sum / smoothed.unsqueeze(1)
        return F.normalize(codes, dim=-1) if l2_normalize else codes

    @torch.no_grad()
    def restart_dead_codes(self, codebook: torch.Tensor, rows: torch.Tensor, threshold: float, seed: int) -> torch.Tensor:
        """Codes whose EMA use is under `threshold` take rows of this call's z_e (all processes', see
        `restart_choice`) and begin at use `threshold` (vector-quantize-pytorch's reset); returns them."""
        expired = self.code_use < threshold  # the same on every process: the counts are all-reduced
        if not bool(expired.any()):
            return expired.nonzero().squeeze(1)
        # Seeded by the restarts so far: a fresh draw each time, and the same one on resume.
        codes, vectors = restart_choice(rows, expired, (seed << 32) + int(self.restarts))
        codebook[codes] = vectors
        self.code_use[codes] = threshold
        if self.code_sum is not None:
            self.code_sum[codes] = vectors * threshold
        self.restarts.add_(codes.numel())
        return codes


@torch.no_grad()
def restart_choice(rows: torch.Tensor, expired: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, rows) for dead-code restart: the expired codes and, for each, a distinct row of this call's
    z_e of every process, drawn by a CPU generator seeded with `seed` from the rows gathered in rank
    order, so that every process picks the same. With more expired codes than rows, a seeded subset of
    them is restarted now and the rest at a later call (vector-quantize-pytorch's rule on one process).
    """
    gathered = all_gather_rows(rows)
    generator = torch.Generator().manual_seed(seed)
    dead = expired.nonzero().squeeze(1)
    if dead.numel() > gathered.shape[0]:
        keep = torch.randperm(dead.numel(), generator=generator)[: gathered.shape[0]]
        dead = dead[keep.to(dead.device)].sort().values
    pick = torch.randperm(gathered.shape[0], generator=generator)[: dead.numel()]
    return dead, gathered[pick.to(gathered.device)]
