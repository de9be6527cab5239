"""Progressive vector quantizer: hardness-annealed VQ (ProVQ, arXiv 2603.22304); hard VQ is hardness 1."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .codebook_init import LatentBuffer, distributed_ready, kmeans_codebook, nearest_code
from .codebook_stats import perplexity, usage
from .schedule import ScheduleConfig

MECHANISMS = ("interpolate", "stochastic")
STAT_NAMES = ("hardness", "perplexity", "usage", "dead_codes", "ever_used", "quant_error")


@dataclass
class QuantizerConfig:
    codebook_size: int = 1024
    codebook_dim: int | None = None  # None: the latent dim; else a linear projection in and out
    l2_normalize: bool = False  # LlamaGen-style cosine codes: z_e and codes on the unit sphere
    beta: float = 0.25  # commitment weight (on the encoder side)
    omega_floor: float = 0.1  # lambda in omega(h) = lambda + (1 - lambda) h
    mechanism: str = "interpolate"  # interpolate | stochastic
    kmeans_init: bool = True  # k-means codebook init when h first leaves 0
    kmeans_iters: int = 10
    kmeans_buffer: int = 16384  # rows of recent z_e per process kept for the init
    kmeans_seed: int = 0
    dead_code_window: int = 100  # a code unused for this many training steps counts as dead
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"quantizer.mechanism must be one of {MECHANISMS}, got {self.mechanism!r}")
        if not 0.0 <= self.omega_floor <= 1.0:
            raise ValueError(f"quantizer.omega_floor must be in [0, 1], got {self.omega_floor}")


@dataclass
class QuantizerOutput:
    """All tensors keep the input layout: (B, D, H, W) for images, (B, N, D) for sequences."""

    z_out: torch.Tensor  # what the decoder gets, in the input's dim (after the out-projection)
    z_e: torch.Tensor  # encoder output in codebook space (projected, normalized)
    z_q: torch.Tensor  # nearest codes, in codebook space (no gradient path to the encoder)
    indices: torch.Tensor  # long (B, H, W) or (B, N)
    vq_loss: torch.Tensor  # omega(h) * (codebook_loss + beta * commitment_loss)
    codebook_loss: torch.Tensor  # mean ||sg(z_e) - z_q||^2 (moves the codes)
    commitment_loss: torch.Tensor  # mean ||z_e - sg(z_q)||^2 (moves the encoder), unweighted
    stats: dict[str, torch.Tensor]  # STAT_NAMES, 0-dim detached tensors
    initialized_now: bool = False  # True on the step the k-means init ran


def vq_loss_weight(hardness: float, omega_floor: float) -> float:
    """omega(h) = lambda + (1 - lambda) h: the codebook follows the encoder gently while h is small."""
    return omega_floor + (1.0 - omega_floor) * hardness


class ProgressiveQuantizer(nn.Module):
    """Vector quantizer whose hardness h in [0, 1] is set per call; one code path for ProVQ and hard VQ.

    Contract: `forward(z, hardness, generator=None)` takes image latents (B, C, H, W)
    or sequences (B, N, C) with C == `latent_dim`, in any float dtype (all
    quantizer math runs in float32, autocast off), and returns a `QuantizerOutput`
    in the same layout. Let z_e be z projected to `codebook_dim` (and
    l2-normalized if configured), z_q its nearest code, and
    z_st = z_e + sg(z_q - z_e) (value exactly z_q, gradient the identity to z_e):

    - `interpolate`: the decoder gets (1 - h) z_e + h z_st, exactly z_e at h = 0
      and exactly z_q at h = 1;
    - `stochastic`: each position gets z_st with probability h, else z_e; the mask
      is drawn from `generator` (required when 0 < h < 1), never the global RNG.

    In training mode, the first call with h > 0 runs k-means over the recent z_e
    (`training_state`, a `LatentBuffer` filled while h == 0; checkpoint it with
    `accelerator.register_for_checkpointing(quantizer.training_state)`, it is not
    in `state_dict()`) and marks the persistent `initialized` buffer; with torch.distributed initialized it gathers all ranks' data and its
    stats are reduced over ranks, so every rank must call it (as under DDP).
    Eval mode does no collectives. `indices_from_latents` / `decode_indices` are
    the hard encode / decode used for stage 2.
    """

    def __init__(self, latent_dim: int, config: QuantizerConfig) -> None:
        super().__init__()
        self.config = config
        self.latent_dim = latent_dim
        self.codebook_dim = config.codebook_dim or latent_dim
        projected = config.codebook_dim is not None  # also at the latent's own size (taming's quant_conv)
        self.proj_in = nn.Linear(latent_dim, self.codebook_dim) if projected else nn.Identity()
        self.proj_out = nn.Linear(self.codebook_dim, latent_dim) if projected else nn.Identity()
        self.codebook = nn.Embedding(config.codebook_size, self.codebook_dim)
        bound = 1.0 / config.codebook_size  # taming-transformers / LlamaGen init
        nn.init.uniform_(self.codebook.weight, -bound, bound)
        # Persistent: a resumed or reloaded model must not re-run the k-means init.
        self.register_buffer("initialized", torch.tensor(not config.kmeans_init))
        # Statistics only: kept out of exported weights.
        steps_unused = torch.zeros(config.codebook_size, dtype=torch.long)
        self.register_buffer("steps_since_used", steps_unused, persistent=False)
        # Codes used by a training batch since the codebook was (re)initialized.
        self.register_buffer("ever_used", torch.zeros(config.codebook_size, dtype=torch.bool), persistent=False)
        # Recent z_e for the k-means init: checkpointed by the trainer, never exported.
        self.training_state = LatentBuffer(config.kmeans_buffer)

    # ---- layout -------------------------------------------------------------------------
    @staticmethod
    def _to_rows(z: torch.Tensor) -> torch.Tensor:
        if z.dim() == 4:
            return z.permute(0, 2, 3, 1).reshape(z.shape[0], -1, z.shape[1])
        if z.dim() == 3:
            return z
        raise ValueError(f"expected (B, C, H, W) or (B, N, D) latents, got shape {tuple(z.shape)}")

    @staticmethod
    def _from_rows(rows: torch.Tensor, like: tuple[int, ...]) -> torch.Tensor:
        if len(like) == 4:
            B, _, H, W = like
            return rows.reshape(B, H, W, rows.shape[-1]).permute(0, 3, 1, 2).contiguous()
        return rows

    @staticmethod
    def _index_shape(like: tuple[int, ...]) -> tuple[int, ...]:
        return (like[0], like[2], like[3]) if len(like) == 4 else (like[0], like[1])

    # ---- pieces ---------------------------------------------------------------------------
    def codebook_vectors(self) -> torch.Tensor:
        """The (codebook_size, codebook_dim) codes as used for lookup (normalized if configured)."""
        weight = self.codebook.weight.float()
        return F.normalize(weight, dim=-1) if self.config.l2_normalize else weight

    def _project_in(self, rows: torch.Tensor) -> torch.Tensor:
        z_e = self.proj_in(rows.float())
        return F.normalize(z_e, dim=-1) if self.config.l2_normalize else z_e

    def _mix(
        self, z_e: torch.Tensor, z_st: torch.Tensor, hardness: float, generator: torch.Generator | None
    ) -> torch.Tensor:
        if hardness <= 0.0:
            return z_e
        if hardness >= 1.0:
            return z_st
        if self.config.mechanism == "interpolate":
            return (1.0 - hardness) * z_e + hardness * z_st
        if generator is None:
            raise ValueError(
                "mechanism 'stochastic' with 0 < hardness < 1 needs a torch.Generator "
                "(training randomness must be reproducible on resume)"
            )
        uniform = torch.rand(z_e.shape[:-1], generator=generator, device=generator.device)
        mask = (uniform < hardness).to(z_e.device).unsqueeze(-1)
        return torch.where(mask, z_st, z_e)

    @torch.no_grad()
    def _maybe_kmeans_init(self, z_e: torch.Tensor, hardness: float) -> bool:
        if not (self.training and self.config.kmeans_init) or bool(self.initialized.item()):
            return False
        self.training_state.add(z_e)
        if hardness <= 0.0:
            return False
        cfg = self.config
        centroids = kmeans_codebook(
            self.training_state, cfg.codebook_size, cfg.kmeans_iters, cfg.kmeans_seed,
            spherical=cfg.l2_normalize,
        )
        self.codebook.weight.copy_(centroids.to(self.codebook.weight))
        self.initialized.fill_(True)
        self.ever_used.zero_()  # a new codebook: its codes start unused
        self.training_state.clear()  # its job is done; free the memory
        return True

    @torch.no_grad()
    def _stats(self, indices, z_e, z_q, hardness: float) -> dict[str, torch.Tensor]:
        K = self.config.codebook_size
        counts = torch.bincount(indices.reshape(-1), minlength=K).float()
        sq_error = (z_e - z_q).pow(2).sum(-1).sum().reshape(1)
        packed = torch.cat([counts, sq_error, counts.new_tensor([indices.numel()])])
        if self.training and distributed_ready():
            dist.all_reduce(packed)  # one collective: every rank reports the global batch
        counts, sq_error, total = packed[:K], packed[K], packed[K + 1]
        if self.training:
            self.steps_since_used.add_(1).masked_fill_(counts > 0, 0)
            self.ever_used |= counts > 0
        return {
            "hardness": counts.new_tensor(float(hardness)),
            "perplexity": perplexity(counts),
            "usage": usage(counts),
            "dead_codes": (self.steps_since_used >= self.config.dead_code_window).sum(),
            "ever_used": self.ever_used.float().mean(),
            "quant_error": sq_error / total,  # mean squared distance per vector
        }

    # ---- API ------------------------------------------------------------------------------
    def forward(
        self, z: torch.Tensor, hardness: float, generator: torch.Generator | None = None
    ) -> QuantizerOutput:
        hardness = float(hardness)
        with torch.autocast(device_type=z.device.type, enabled=False):
            z_e = self._project_in(self._to_rows(z))
            initialized_now = self._maybe_kmeans_init(z_e, hardness)
            codes = self.codebook_vectors()
            indices = nearest_code(z_e.reshape(-1, self.codebook_dim), codes).view(z_e.shape[:-1])
            z_q = F.embedding(indices, codes)
            codebook_loss = F.mse_loss(z_q, z_e.detach())
            commitment_loss = F.mse_loss(z_e, z_q.detach())
            omega = vq_loss_weight(hardness, self.config.omega_floor)
            vq_loss = omega * (codebook_loss + self.config.beta * commitment_loss)
            # Value exactly z_q (adds an exact zero), gradient the identity to z_e only.
            z_st = z_q.detach() + (z_e - z_e.detach())
            z_out = self.proj_out(self._mix(z_e, z_st, hardness, generator))
            stats = self._stats(indices, z_e.detach(), z_q.detach(), hardness)
        shape = tuple(z.shape)
        return QuantizerOutput(
            z_out=self._from_rows(z_out, shape),
            z_e=self._from_rows(z_e, shape),
            z_q=self._from_rows(z_q, shape),
            indices=indices.view(self._index_shape(shape)),
            vq_loss=vq_loss,
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
            stats=stats,
            initialized_now=initialized_now,
        )

    @torch.no_grad()
    def indices_from_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Hard codes for latents: (B, C, H, W) -> (B, H, W) or (B, N, C) -> (B, N); no collectives."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            z_e = self._project_in(self._to_rows(z))
            indices = nearest_code(z_e.reshape(-1, self.codebook_dim), self.codebook_vectors())
        return indices.view(self._index_shape(tuple(z.shape)))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Latents for the decoder from codes: (B, H, W) -> (B, C, H, W) or (B, N) -> (B, N, C)."""
        if indices.dim() not in (2, 3):
            raise ValueError(f"expected indices (B, H, W) or (B, N), got {tuple(indices.shape)}")
        with torch.autocast(device_type=indices.device.type, enabled=False):
            rows = self.proj_out(F.embedding(indices.reshape(indices.shape[0], -1),
                                             self.codebook_vectors()))
        if indices.dim() == 3:
            B, H, W = indices.shape
            return self._from_rows(rows, (B, self.latent_dim, H, W))
        return rows
