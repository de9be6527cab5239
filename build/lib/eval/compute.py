"""The evaluation loops: Inception statistics of an image source, and reconstruction metrics of a tokenizer."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from eval.fid import FeatureStats, InceptionScoreAccumulator, feature_stats
from eval.inception import FEATURE_DIM, FIDInception, InceptionOutput, preprocess, protocol
from eval.metrics import codebook_usage, ssim, ssim_llamagen, uint8_psnr
from provq.common.moments import MomentAccumulator
from provq.common.signals import SafePoints, interrupted
from provq.data.pixels import to_uint8
from provq.training.accelerator import process_state


@dataclass
class Processes:
    """Rank, world size and device of an evaluation (one process, or a launcher's group)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls, device: str | None = None) -> Processes:
        state = process_state(device)
        return cls(state.process_index, state.num_processes, torch.device(device or state.device))

    def gather_rows(self, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """(indices, rows) of this process's batches -> every process's rows, in index order."""
        indices = torch.cat([i for i, _ in parts]) if parts else torch.zeros(0, dtype=torch.long)
        rows = torch.cat([r for _, r in parts]) if parts else torch.zeros(0, FEATURE_DIM)
        if self.world > 1:
            gathered = [None] * self.world
            torch.distributed.all_gather_object(gathered, (indices, rows))
            indices = torch.cat([g[0] for g in gathered])
            rows = torch.cat([g[1] for g in gathered])
        return rows[indices.argsort()]

    def sum(self, tensors: list[torch.Tensor]) -> None:
        """In-place sum over processes (sums are what every accumulator here keeps)."""
        if self.world > 1:
            for tensor in tensors:
                torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)


def extract(model: FIDInception, images: torch.Tensor, bf16: bool = False) -> InceptionOutput:
    """Features (and logits) of uint8 images, in fp32.

    bf16 (the trunk under autocast; the resize stays fp32) is for bench/fid.py only: it moved FID
    by 0.21% on emoji (bench/results/fid.json), over the 0.1% the project allows, so no command offers it.
    """
    device = next(model.parameters()).device
    with torch.inference_mode():
        x = preprocess(images.to(device)).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            features = model.features(x).float()
        logits = model.logits(features)
    return InceptionOutput(features, logits)


@dataclass
class EvalSetup:
    """What every pass over images shares: the Inception network, the processes, the batching."""

    model: FIDInception
    procs: Processes
    batch_size: int = 64  # per process
    num_workers: int = 0  # DataLoader workers decoding images

    def batches(self, source):
        """This process's batches of ``source`` (each image in exactly one process). SIGINT or SIGTERM
        stops every process after a batch (``Interrupted``): nothing is written."""
        procs, safe = self.procs, SafePoints(self.procs.world, self.procs.device)
        rounds = source.num_batches(self.batch_size, 0, procs.world)  # the first process has the most
        yield from safe.over(source.batches(self.batch_size, procs.rank, procs.world, self.num_workers), rounds)
        if safe.signum:
            mine = source.num_batches(self.batch_size, procs.rank, procs.world)
            raise interrupted(safe.signum, f"after {safe.done} of {mine} batches of {source.name}", "nothing was written")

    def progress(self, source, desc: str):
        total = source.num_batches(self.batch_size, self.procs.rank, self.procs.world)
        return tqdm(total=total, desc=desc, file=sys.stderr, disable=not self.procs.is_main, leave=False)


@dataclass
class StatsResult:
    stats: FeatureStats
    inception_score: tuple[float, float] | None  # (mean, std) over 10 splits, when the weights give logits
    skipped: int
    cached: bool = False  # read from the statistics cache (eval.stats_cache), not computed
    features: torch.Tensor | None = None  # every image's pool3 features, when asked for (precision/recall)


def source_stats(source, setup: EvalSetup, desc: str = "inception", keep_features: bool = False) -> StatsResult:
    """Streamed float64 statistics of every image of `source`, each counted once over all processes;
    ``keep_features`` also keeps each image's features (gathered from all processes in image order)."""
    model, procs = setup.model, setup.procs
    features = MomentAccumulator(FEATURE_DIM, device=procs.device)
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    scores = InceptionScoreAccumulator(len(source), device=procs.device) if model.fc is not None else None
    skipped = torch.zeros((), dtype=torch.float64, device=procs.device)
    with setup.progress(source, desc) as bar:
        for batch in setup.batches(source):
            skipped += batch.skipped
            if len(batch.indices):
                out = extract(model, batch.images)
                features.update(out.features)
                if keep_features:
                    kept.append((batch.indices, out.features.float().cpu()))
                if scores is not None:
                    scores.update(out.logits, batch.indices)
            bar.update()
    procs.sum(features.tensors() + [skipped] + (scores.tensors() if scores else []))
    stats = feature_stats(features, model.checksum, protocol(model))
    return StatsResult(stats, scores.finalize() if scores else None,
                       int(skipped.item()) + len(getattr(source, "unreadable", [])),
                       features=procs.gather_rows(kept) if keep_features else None)


@dataclass
class ReconstructionResult:
    originals: FeatureStats | None  # None when the caller passed originals_known (or no Inception)
    reconstructions: FeatureStats | None  # None when the setup has no Inception model (pixels only)
    metrics: dict  # psnr, ssim, lpips (when available), codebook usage and perplexity
    images: int  # images evaluated over all processes


def _reconstruct(tokenizer, floats: torch.Tensor):
    codes = tokenizer.encode(floats)  # hard indices: evaluation is always fully discrete
    return codes, tokenizer.decode(codes).float().clamp(-1, 1)


def reconstruction_stats(source, tokenizer, setup: EvalSetup, lpips_model=None,
                         originals_known: bool = False, ssim_protocol: str = "standard") -> ReconstructionResult:
    """Encode and decode every image of a DatasetSource; FID inputs, PSNR, SSIM, LPIPS on uint8 pixels.

    ``originals_known``: the caller has the originals' statistics already (they
    do not depend on the tokenizer), so only the reconstructions go through
    Inception: half the cost of an rFID. A setup without a model (``model=None``) measures the
    pixels only: no Inception at all.
    """
    model, procs = setup.model, setup.procs
    originals, reconstructions = (MomentAccumulator(FEATURE_DIM, device=procs.device) for _ in range(2))
    codebook_size = tokenizer.config.quantizer.codebook_size
    counts = torch.zeros(codebook_size, dtype=torch.float64, device=procs.device)
    # psnr, ssim, lpips sums, images, skipped: one tensor so a single reduction sums them all
    sums = torch.zeros(5, dtype=torch.float64, device=procs.device)
    with setup.progress(source, "rfid") as bar:
        for batch in setup.batches(source):
            sums[4] += batch.skipped
            bar.update()
            if not len(batch.indices):
                continue
            with torch.inference_mode():
                codes, recon = _reconstruct(tokenizer, batch.floats.to(procs.device))
            counts += torch.bincount(codes.flatten().to(procs.device), minlength=codebook_size).double()
            real, fake = batch.images.to(procs.device), to_uint8(recon)
            if model is not None and originals_known:
                reconstructions.update(extract(model, fake).features)
            elif model is not None:
                out = extract(model, torch.cat([real, fake]))
                originals.update(out.features[: len(real)])
                reconstructions.update(out.features[len(real):])
            sums[:4] += _pixel_metric_sums(real, fake, lpips_model, ssim_protocol)
    procs.sum(originals.tensors() + reconstructions.tensors() + [counts, sums])
    n = max(sums[3].item(), 1.0)
    metrics = {"psnr": sums[0].item() / n, "ssim": sums[1].item() / n, **codebook_usage(counts),
               "skipped": int(sums[4].item())}
    if lpips_model is not None:
        metrics["lpips"] = sums[2].item() / n
    if model is None:
        return ReconstructionResult(None, None, metrics, int(sums[3].item()))
    proto = protocol(model)
    return ReconstructionResult(None if originals_known else feature_stats(originals, model.checksum, proto),
                                feature_stats(reconstructions, model.checksum, proto), metrics, int(sums[3].item()))


def _pixel_metric_sums(real: torch.Tensor, fake: torch.Tensor, lpips_model, ssim_protocol: str) -> torch.Tensor:
    """Sums over the batch of PSNR, SSIM, LPIPS, and the image count."""
    x, y = real.double() / 255, fake.double() / 255
    lpips_sum = 0.0
    if lpips_model is not None:
        with torch.inference_mode():
            lpips_sum = lpips_model(x.float() * 2 - 1, y.float() * 2 - 1).sum().item()
    structural = ssim(x, y) if ssim_protocol == "standard" else ssim_llamagen(x, y)
    return torch.tensor([uint8_psnr(real, fake).double().sum().item(), structural.double().sum().item(), lpips_sum,
                         float(len(real))], dtype=torch.float64, device=real.device)
