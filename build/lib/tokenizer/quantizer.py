"""Progressive vector quantizer: hardness-annealed VQ (ProVQ, arXiv 2603.22304); hard VQ is hardness 1."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from provq.common.typed_config import check_ranges

from .codebook_init import LatentBuffer, distributed_ready, kmeans_codebook, nearest_code
from .codebook_stats import perplexity, usage
from .families import MAX_LFQ_BITS, BinaryCodes, FiniteScalarCodes, lfq_entropy_terms
from .remedies import CodeUseEMA, check_remedies, make_codebook, rotation_trick
from .schedule import ScheduleConfig
from .soft_assignment import SOFT_MECHANISMS, annealed_temperature, codebook_mixture

MECHANISMS = ("interpolate", "stochastic", *SOFT_MECHANISMS)
KINDS = ("vq", "fsq", "lfq")
STAT_NAMES = ("hardness", "perplexity", "usage", "dead_codes", "ever_used", "quant_error")
VQ_DEFAULTS = {"codebook_size": 1024, "l2_normalize": True, "kmeans_init": True}
VQ_DEFAULT_CODEBOOK_DIM = 8  # what codebook_dim 0 (unset) means for vq; files keep the resolved value


@dataclass
class QuantizerConfig:
    """One quantizer family under the hardness curriculum; fields marked vq/fsq/lfq belong to that
    family. None means the family's default; the config keeps the resolved values."""

    kind: str = "vq"  # vq (nearest code of a learned codebook) | fsq | lfq (lookup-free, no codebook)
    codebook_size: int | None = None  # number of codes; vq: 1024; fsq: prod(levels); lfq: 2 ** bits
    # vq: code vector dim (0: the default, 8; None: the latent's, no projection); fsq/lfq: derived from
    # levels/bits, leave it unset (0 or null; a saved file's own channel count also reads)
    codebook_dim: int | None = 0
    l2_normalize: bool | None = None  # vq: LlamaGen's cosine codes, z_e and codes on the sphere (default)
    levels: list[int] | None = None  # fsq: levels per channel, e.g. [8, 5, 5, 5] = 1,000 codes
    bits: int | None = None  # lfq: bits per code, 2 ** bits codes
    beta: float = 0.25  # commitment weight (on the encoder side); vq and lfq
    entropy_weight: float = 0.1  # lfq: weight of the entropy penalty
    diversity_weight: float = 1.0  # lfq: gamma, the batch-average entropy's weight inside the penalty
    entropy_temperature: float = 0.01  # lfq: tau of the soft code assignment softmax(-||z - c||^2 / tau)
    # lfq: the batch entropy is exact over all codes where rows x 2^bits fits LFQ_EXACT_ENTROPY_VALUES,
    # else the sum over groups of this many bits (an approximation from above)
    entropy_group_bits: int = 10
    omega_floor: float = 0.1  # lambda in omega(h) = lambda + (1 - lambda) h
    mechanism: str = "interpolate"  # interpolate | stochastic | soft | gumbel (the last two: vq only)
    soft_temperature_start: float = 1.0  # soft/gumbel: tau at h = 0, in squared code-space distance
    soft_temperature_end: float = 1e-3  # soft/gumbel: tau as h -> 1 (log-linear between; h = 1 is hard)
    kmeans_init: bool | None = None  # vq: k-means codebook init when h first leaves 0 (default on)
    kmeans_iters: int = 10
    kmeans_buffer: int = 16384  # rows of recent z_e per process kept for the init
    kmeans_seed: int = 0
    dead_code_window: int = 100  # a code unused for this many training steps counts as dead
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # The other remedies for codebook collapse, composable with any schedule and mechanism; vq only, all off
    # by default (tokenizer/remedies.py; README, "Configuration"):
    ema_codebook: bool = False  # codes = EMA of their assigned z_e over Laplace-smoothed counts; no codebook loss
    codebook_ema_decay: float = 0.99  # decay of the EMA codebook and of the code use dead_code_threshold reads
    dead_code_threshold: float = 0.0  # restart a code whose EMA use per training call falls under this (0: off)
    rotation_trick: bool = False  # the encoder's gradient through the rotation of z_e onto z_q (Fifty et al.)
    simvq: bool = False  # codes = frozen random basis x one learned linear map (Zhu et al.); no k-means init

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"quantizer.kind must be one of {KINDS}, got {self.kind!r}")
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"quantizer.mechanism must be one of {MECHANISMS}, got {self.mechanism!r}")
        if self.mechanism in SOFT_MECHANISMS and self.kind != "vq":
            raise ValueError(f"quantizer.mechanism {self.mechanism!r} is a soft assignment over a learned "
                             f"codebook: kind vq only, not {self.kind} (use interpolate or stochastic)")
        check_ranges(self, fraction=("omega_floor",), positive=("entropy_temperature", "entropy_group_bits",
                                                                  "kmeans_buffer", "dead_code_window",
                                                                  "soft_temperature_start", "soft_temperature_end"),
                     non_negative=("beta", "entropy_weight", "diversity_weight", "kmeans_iters"))
        # a group never needs more bits than a code has; codebook_dim 0: the family's default
        check_ranges(self, bounds={"entropy_group_bits": (1, MAX_LFQ_BITS)}, non_negative=("codebook_dim",),
                     prefix="quantizer.")
        if self.kind == "vq":
            self._resolve_vq()
        else:
            self._resolve_lookup_free()
        check_ranges(self, at_least_one=("codebook_size",), prefix="quantizer.")
        check_remedies(self)

    def _resolve_vq(self) -> None:
        if self.simvq and self.kmeans_init is None:
            self.kmeans_init = False  # k-means centroids cannot set an implicit codebook
        for name, default in VQ_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        if self.codebook_dim == 0:
            self.codebook_dim = VQ_DEFAULT_CODEBOOK_DIM
        self._only_for("vq", levels=None, bits=None)

    def _only_for(self, kind: str, **unset) -> None:
        for name, value in unset.items():
            if getattr(self, name) != value:
                raise ValueError(f"quantizer.{name} does not apply to kind {self.kind!r} "
                                 f"(leave it unset, or set kind: {kind})")

    def _resolve_lookup_free(self) -> None:
        if self.kind == "fsq":
            self._only_for("lfq", bits=None)
            family = FiniteScalarCodes(self.levels)  # refuses levels it cannot quantize with
            size, dim = family.num_codes, family.dim
        else:
            self._only_for("fsq", levels=None)
            if self.bits is None:
                raise ValueError(f"quantizer.bits must be set for kind lfq (in [1, {MAX_LFQ_BITS}])")
            check_ranges(self, bounds={"bits": (1, MAX_LFQ_BITS)}, prefix="quantizer.")
            size, dim = 2**self.bits, self.bits
        if self.l2_normalize:
            raise ValueError(f"quantizer.l2_normalize applies to kind vq only, not {self.kind}")
        if self.kmeans_init:
            raise ValueError(f"quantizer.kmeans_init applies to kind vq only ({self.kind} has no codebook)")
        if self.codebook_size not in (None, size):
            raise ValueError(f"quantizer.codebook_size {self.codebook_size} differs from the {size} codes "
                             f"of {self.kind} {self.levels or self.bits} (leave it unset)")
        if self.codebook_dim not in (0, None, dim):  # dim: what a saved config.json of this family holds
            raise ValueError(f"quantizer.codebook_dim applies to kind vq only: {self.kind} {self.levels or self.bits} "
                             f"has {dim} channels, not {self.codebook_dim} (leave it unset)")
        self.codebook_size, self.codebook_dim, self.l2_normalize, self.kmeans_init = size, dim, False, False

    def code_family(self) -> FiniteScalarCodes | BinaryCodes | None:
        """The lookup-free family's code math; None for vq (its codebook is a learned parameter)."""
        if self.kind == "fsq":
            return FiniteScalarCodes(self.levels)
        return BinaryCodes(self.bits) if self.kind == "lfq" else None


@dataclass
class QuantizerOutput:
    """All tensors keep the input layout: (B, D, H, W) for images, (B, N, D) for sequences."""

    z_out: torch.Tensor  # what the decoder gets, in the input's dim (after the out-projection)
    z_e: torch.Tensor  # encoder output in code space (projected; normalized or bounded by the family)
    z_q: torch.Tensor  # its hard code, in code space (no gradient path to the encoder)
    indices: torch.Tensor  # long (B, H, W) or (B, N)
    loss: torch.Tensor  # omega(h) * (codebook_loss + beta * commitment_loss + entropy_weight * entropy_loss)
    codebook_loss: torch.Tensor  # vq: mean ||sg(z_e) - z_q||^2 (moves the codes); else 0
    commitment_loss: torch.Tensor  # vq, lfq: mean ||z_e - sg(z_q)||^2 (moves the encoder), unweighted
    entropy_loss: torch.Tensor  # lfq: per-sample entropy - gamma * batch entropy, unweighted; else 0
    # STAT_NAMES (+ lfq in training: batch_entropy_exact; with dead_code_threshold: code_restarts, all
    # time), 0-dim detached tensors
    stats: dict[str, torch.Tensor]
    initialized_now: bool = False  # True on the step the k-means init ran


def quantizer_loss_weight(hardness: float, omega_floor: float) -> float:
    """omega(h) = lambda + (1 - lambda) h: the quantizer's terms act gently while h is small."""
    return omega_floor + (1.0 - omega_floor) * hardness


class ProgressiveQuantizer(nn.Module):
    """A quantizer whose hardness h in [0, 1] is set per call; one code path for ProVQ and hard
    quantization (h = 1), for every family (`QuantizerConfig.kind`: vq, fsq, lfq).

    Contract: `forward(z, hardness, generator=None)` takes image latents (B, C, H, W)
    or sequences (B, N, C) with C == `latent_dim`, in any float dtype (all
    quantizer math runs in float32, autocast off), and returns a `QuantizerOutput`
    in the same layout. Let z_e be z projected to `codebook_dim` and mapped by the
    family (vq: l2-normalized if configured; fsq: bounded; lfq: as is), z_q its hard
    code (vq: the nearest codebook vector; fsq: each channel rounded; lfq: each
    channel's sign), and z_st = z_e + sg(z_q - z_e) (value exactly z_q, gradient the
    identity to z_e):

    - `interpolate`: the decoder gets (1 - h) z_e + h z_st, exactly z_e at h = 0
      and exactly z_q at h = 1;
    - `stochastic`: each position gets z_st with probability h, else z_e; the mask
      is drawn from `generator` (required when 0 < h < 1), never the global RNG;
    - `soft` (vq only): for h < 1, from h = 0 on, the codebook mixture sum_k w_k c_k with
      w = softmax(-||z_e - c_k||^2 / tau(h)), tau log-linear from `soft_temperature_start`
      to `soft_temperature_end`; exactly z_st at h = 1. Gradient reaches z_e and every code
      through w (tokenizer/soft_assignment.py); with l2 codes the mixture lies inside the ball;
    - `gumbel` (vq only): as `soft` with Gumbel noise on the logits, from `generator`.

    The loss terms are the hard ones for every mechanism (nearest code, weighted by omega(h)).

    vq only, the remedies (`tokenizer.remedies`): with `rotation_trick`, z_st's gradient is the
    rotation of z_e onto z_q instead of the identity, in either mechanism; `simvq` makes the codebook a
    frozen basis times a learned map; `ema_codebook` and `dead_code_threshold` update the codes outside
    the optimizer in training mode (state in `code_ema`, non-persistent buffers: register
    `training.NonPersistentBuffers(quantizer)` for checkpoints), from the k-means init on if one is due.

    vq only: in training mode, the first call with h > 0 runs k-means over the recent
    z_e (`kmeans_buffer`, a `LatentBuffer` filled while h == 0; checkpoint it with
    `accelerator.register_for_checkpointing(quantizer.kmeans_buffer)`, it is not in
    `state_dict()`) and marks the persistent `initialized` buffer. With
    torch.distributed initialized, k-means and restarts gather all ranks' data, the
    statistics (and lfq's batch entropy, the EMA's counts and sums) are reduced over
    ranks, so every rank must call it (as under DDP). Eval mode does no collectives.
    `indices_from_latents` / `decode_indices` are the hard encode / decode used for stage 2.
    """

    def __init__(self, latent_dim: int, config: QuantizerConfig) -> None:
        super().__init__()
        self.config = config
        self.latent_dim = latent_dim
        self.family = config.code_family()
        self.codebook_dim = config.codebook_dim or latent_dim
        projected = config.codebook_dim is not None  # also at the latent's own size (taming's quant_conv)
        self.proj_in = nn.Linear(latent_dim, self.codebook_dim) if projected else nn.Identity()
        self.proj_out = nn.Linear(self.codebook_dim, latent_dim) if projected else nn.Identity()
        self.code_ema = None  # the EMA codebook's and dead-code restart's state (CodeUseEMA) when on
        if self.family is None:
            self.codebook = make_codebook(config, self.codebook_dim)
            # Persistent: a resumed or reloaded model must not re-run the k-means init.
            self.register_buffer("initialized", torch.tensor(not config.kmeans_init))
            if config.ema_codebook or config.dead_code_threshold > 0:
                self.code_ema = CodeUseEMA(config.codebook_size, self.codebook_dim, track_sums=config.ema_codebook)
        # Statistics only: kept out of exported weights.
        steps_unused = torch.zeros(config.codebook_size, dtype=torch.long)
        self.register_buffer("steps_since_used", steps_unused, persistent=False)
        # Codes used by a training batch since the codebook was (re)initialized.
        self.register_buffer("ever_used", torch.zeros(config.codebook_size, dtype=torch.bool), persistent=False)
        # Recent z_e for the k-means init: checkpointed by the trainer, never exported.
        self.kmeans_buffer = LatentBuffer(config.kmeans_buffer)

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
        """Every code as a (codebook_size, codebook_dim) vector (vq: normalized if configured)."""
        if self.family is not None:
            return self.family.all_vectors(self.steps_since_used.device)
        weight = self.codebook.weight.float()
        return F.normalize(weight, dim=-1) if self.config.l2_normalize else weight

    def _project_in(self, rows: torch.Tensor) -> torch.Tensor:
        z_e = self.proj_in(rows.float())
        if self.family is not None:
            return self.family.latent(z_e)
        return F.normalize(z_e, dim=-1) if self.config.l2_normalize else z_e

    def _hard_codes(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_q, indices) of z_e rows (..., codebook_dim)."""
        if self.family is not None:
            return self.family.quantize(z_e)
        codes = self.codebook_vectors()
        indices = nearest_code(z_e.reshape(-1, self.codebook_dim), codes).view(z_e.shape[:-1])
        return F.embedding(indices, codes), indices

    def _losses(self, z_e: torch.Tensor, z_q: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict]:
        """The family's unweighted terms (codebook, commitment and entropy losses; 0 where none), and the
        statistics they report (lfq in training: whether the batch entropy was exact)."""
        zero = z_e.new_zeros(())
        if self.config.kind == "fsq":  # FSQ needs none: its codes are fixed and its latent bounded
            return {"codebook_loss": zero, "commitment_loss": zero, "entropy_loss": zero}, {}
        commitment = F.mse_loss(z_e, z_q.detach())
        if self.config.kind == "lfq":
            entropy, stats = zero, {}
            if self.training:  # a training regularizer; evaluation does no collectives
                terms = lfq_entropy_terms(z_e, 1.0 / self.config.entropy_temperature, self.config.entropy_group_bits)
                entropy = terms.per_sample - self.config.diversity_weight * terms.batch
                stats["batch_entropy_exact"] = zero.new_tensor(float(terms.exact))
            return {"codebook_loss": zero, "commitment_loss": commitment, "entropy_loss": entropy}, stats
        codebook = zero if self.config.ema_codebook else F.mse_loss(z_q, z_e.detach())  # the EMA moves them
        return {"codebook_loss": codebook, "commitment_loss": commitment, "entropy_loss": zero}, {}

    def _straight_through(self, z_e: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
        """Value exactly z_q; gradient to z_e only: the identity, or with rotation_trick the rotation of z_e
        onto z_q (it then takes the straight-through's place in every mechanism's mix)."""
        if self.config.rotation_trick:
            return rotation_trick(z_e, z_q)
        return z_q.detach() + (z_e - z_e.detach())  # adds an exact zero

    def _mix(
        self, z_e: torch.Tensor, z_st: torch.Tensor, hardness: float, generator: torch.Generator | None
    ) -> torch.Tensor:
        if hardness >= 1.0:
            return z_st
        if self.config.mechanism in SOFT_MECHANISMS:
            return self._codebook_mixture(z_e, hardness, generator)
        if hardness <= 0.0:
            return z_e
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

    def _codebook_mixture(
        self, z_e: torch.Tensor, hardness: float, generator: torch.Generator | None
    ) -> torch.Tensor:
        """soft / gumbel below h = 1: every code weighted by its soft assignment at tau(h), from h = 0."""
        cfg = self.config
        if cfg.mechanism == "gumbel" and generator is None:
            raise ValueError("mechanism 'gumbel' with hardness < 1 needs a torch.Generator "
                             "(training randomness must be reproducible on resume)")
        tau = annealed_temperature(hardness, cfg.soft_temperature_start, cfg.soft_temperature_end)
        noise = generator if cfg.mechanism == "gumbel" else None
        mixed = codebook_mixture(z_e.reshape(-1, self.codebook_dim), self.codebook_vectors(), tau, noise)
        return mixed.view(z_e.shape)

    @torch.no_grad()
    def _maybe_kmeans_init(self, z_e: torch.Tensor, fit: bool) -> bool:
        if not (self.training and self.config.kmeans_init) or bool(self.initialized.item()):
            return False
        self.kmeans_buffer.add(z_e)
        if not fit:
            return False
        cfg = self.config
        centroids = kmeans_codebook(
            self.kmeans_buffer, cfg.codebook_size, cfg.kmeans_iters, cfg.kmeans_seed,
            spherical=cfg.l2_normalize,
        )
        self.codebook.weight.copy_(centroids.to(self.codebook.weight))
        self.initialized.fill_(True)
        self.ever_used.zero_()  # a new codebook: its codes start unused
        if self.code_ema is not None:
            self.code_ema.ready.fill_(False)  # the EMA state starts again from the new codebook
        self.kmeans_buffer.clear()  # its job is done; free the memory
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

    @torch.no_grad()
    def _restart_dead_codes(self, z_e: torch.Tensor) -> None:
        """Before the lookup, so that no autograd graph holds the codes it overwrites (training only): codes
        whose EMA use fell under dead_code_threshold at the last update take rows of this call's z_e."""
        cfg = self.config
        if self.training and cfg.dead_code_threshold > 0 and bool(self.code_ema.ready.item()):
            codes = self.code_ema.restart_dead_codes(self.codebook.weight, z_e.reshape(-1, self.codebook_dim),
                                                     cfg.dead_code_threshold, cfg.kmeans_seed)
            self.steps_since_used[codes] = 0  # new codes, not yet dead ones

    @torch.no_grad()
    def _track_code_use(self, z_e: torch.Tensor, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """After the lookup (training, once the codebook is set): the EMA step of the code use and, with
        ema_codebook, of the codes. Returns the restarts so far when dead-code restart is on."""
        state, cfg = self.code_ema, self.config
        if self.training and bool(self.initialized.item()):
            if not bool(state.ready.item()):
                state.start(self.codebook_vectors())
            state.update(z_e.reshape(-1, self.codebook_dim), indices.reshape(-1), cfg.codebook_ema_decay)
            if cfg.ema_codebook:
                self.codebook.weight.copy_(state.codes(cfg.l2_normalize))
        return {"code_restarts": state.restarts.float()} if cfg.dead_code_threshold > 0 else {}

    # ---- API ------------------------------------------------------------------------------
    def forward(
        self, z: torch.Tensor, hardness: float, generator: torch.Generator | None = None,
        fit_codebook: bool | None = None,
    ) -> QuantizerOutput:
        hardness = float(hardness)
        fit = hardness > 0.0 if fit_codebook is None else bool(fit_codebook)  # the trainer's schedule.kmeans_at
        with torch.autocast(device_type=z.device.type, enabled=False):
            z_e = self._project_in(self._to_rows(z))
            initialized_now = self.family is None and self._maybe_kmeans_init(z_e, fit)
            if self.code_ema is not None:
                self._restart_dead_codes(z_e.detach())
            z_q, indices = self._hard_codes(z_e)
            terms, family_stats = self._losses(z_e, z_q)
            cfg = self.config
            weighted = terms["codebook_loss"] + cfg.beta * terms["commitment_loss"]
            if cfg.kind == "lfq":
                weighted = weighted + cfg.entropy_weight * terms["entropy_loss"]
            loss = quantizer_loss_weight(hardness, cfg.omega_floor) * weighted
            z_st = self._straight_through(z_e, z_q)
            z_out = self.proj_out(self._mix(z_e, z_st, hardness, generator))
            stats = self._stats(indices, z_e.detach(), z_q.detach(), hardness) | family_stats
            if self.code_ema is not None:
                stats |= self._track_code_use(z_e.detach(), indices)
        shape = tuple(z.shape)
        return QuantizerOutput(
            z_out=self._from_rows(z_out, shape),
            z_e=self._from_rows(z_e, shape),
            z_q=self._from_rows(z_q, shape),
            indices=indices.view(self._index_shape(shape)),
            loss=loss,
            stats=stats,
            initialized_now=initialized_now,
            **terms,
        )

    @torch.no_grad()
    def indices_from_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Hard codes for latents: (B, C, H, W) -> (B, H, W) or (B, N, C) -> (B, N); no collectives."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            _, indices = self._hard_codes(self._project_in(self._to_rows(z)))
        return indices.reshape(self._index_shape(tuple(z.shape)))

    def _check_code_range(self, indices: torch.Tensor) -> None:
        # FSQ's and LFQ's digit arithmetic would wrap a foreign code onto a real one, silently.
        count = self.config.codebook_size
        outside = (indices < 0) | (indices >= count)
        if indices.numel() and bool(outside.any()):
            bad = int(indices[outside][0])
            raise IndexError(f"decode_indices: code {bad} is outside [0, {count}), the codes of this quantizer")

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Latents for the decoder from codes: (B, H, W) -> (B, C, H, W) or (B, N) -> (B, N, C)."""
        if indices.dim() not in (2, 3):
            raise ValueError(f"expected indices (B, H, W) or (B, N), got {tuple(indices.shape)}")
        flat = indices.reshape(indices.shape[0], -1)
        self._check_code_range(flat)
        with torch.autocast(device_type=indices.device.type, enabled=False):
            if self.family is not None:
                vectors = self.family.vectors(flat)
            else:
                vectors = F.embedding(flat, self.codebook_vectors())
            rows = self.proj_out(vectors)
        if indices.dim() == 3:
            B, H, W = indices.shape
            return self._from_rows(rows, (B, self.latent_dim, H, W))
        return rows
