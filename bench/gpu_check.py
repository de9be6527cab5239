"""One check of the scale path on one GPU: the recipe's tokenizer with the GAN, GPT-B, guided sampling, FID features.

    python -m bench.gpu_check                       # on a GPU: about 5 minutes; JSON in bench/results/
    python -m bench.gpu_check --out /tmp/check.json  # on a CPU: the same code path at tiny sizes (CI)

On synthetic data, through the scripts' own step functions (train_tokenizer.train_step with
the discriminator step, train_prior.train_step, generator.sampling.sample, eval.compute.extract):

1. configs/imagenet256.yaml's tokenizer (VQ-16 shape) at 256 px, GAN on from step 0, LPIPS with a
   random VGG trunk (its weights cannot be downloaded on the check machine; the cost is the
   same), batch 16, bf16: images/s;
2. GPT-B of the same preset on 16x16 codes of 16,384, batch 32, bf16: tokens/s and the model-FLOPs
   utilisation (PaLM's 6N + 12 L H Q T FLOPs per token) against the GPU's dense bf16 peak (from
   NVIDIA's datasheet, named in the JSON) and against a bf16 matmul measured in the same run;
3. KV-cached sampling of 32 images with CFG 2.0 (bf16 autocast), eager as the sample command runs it:
   images/s and tokens/s;
4. Inception features (the FID extractor, fp32) of 1,000 images at 256 px: images/s.

Every figure carries the peak GPU memory and whether any loss was non-finite. On a CPU the sizes
shrink (the emoji32 preset, a few steps) so that CI runs the whole script in about a minute, in bf16
only where the CPU computes it (mixed_precision auto): emulated bf16 is ~50x slower than fp32.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.results_io import write_result
from eval.compute import extract
from eval.inception import load_inception
from generator import CodeShardWriter, CodesManifest
from generator.sampling import sample
from provq import training
from provq.commands import (
    train_prior,
    train_tokenizer,
)
from provq.common.presets import load_preset
from provq.common.typed_config import build_config
from provq.pipeline.presets import preset_models
from provq.training.accelerator import resolve_precision
from tokenizer import losses

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, FLOP/s.
DENSE_BF16_PEAK = {"H200": (989.5e12, "NVIDIA H200 datasheet: 1,979 TFLOPS BF16 with sparsity, half dense"),
                   "H100": (989.5e12, "NVIDIA H100 SXM datasheet: 1,979 TFLOPS BF16 with sparsity, half dense"),
                   "A100": (312e12, "NVIDIA A100 datasheet: 312 TFLOPS BF16 dense")}


@dataclass
class Sizes:
    preset: str
    classes: int
    tokenizer_batch: int
    prior_batch: int
    warmup: int
    steps: int
    samples: int
    inception_images: int
    inception_resolution: int


GPU = Sizes("imagenet256", 1000, 16, 32, 3, 20, 32, 1000, 256)
CPU = Sizes("emoji32", 10, 4, 8, 1, 2, 2, 16, 32)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed_steps(accelerator, parts, step_fn, train, sizes: Sizes) -> tuple[float, bool]:
    """Seconds per timed step (after the warm-up) of a script's step function, and whether a
    logged term was non-finite."""
    batches = endless(parts.train_loader, accelerator.device)
    nonfinite, start = False, 0.0
    for step in range(sizes.warmup + sizes.steps):
        if step == sizes.warmup:
            synchronize(accelerator.device)
            start = time.perf_counter()
        with accelerator.accumulate(*parts.accumulated()):
            terms = step_fn(parts, next(batches), training.StepContext(step, step, accelerator, train))
        values = [float(v) for v in {**terms.averaged, **terms.shared}.values()]
        nonfinite |= not all(math.isfinite(v) for v in values)
    synchronize(accelerator.device)
    return (time.perf_counter() - start) / sizes.steps, nonfinite


class SyntheticImages(torch.utils.data.Dataset):
    """Random images in [-1, 1] in the data contract's item layout."""

    def __init__(self, count: int, resolution: int):
        self.images = torch.rand(count, 3, resolution, resolution, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index] * 2 - 1, "label": index % 10, "index": index}


def endless(loader, device):
    while True:
        for batch in loader:
            yield {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def check_tokenizer(sizes: Sizes, folder: Path, precision: str) -> dict:
    mapping = load_preset(sizes.preset)
    config = build_config(train_tokenizer.TrainTokenizerConfig, {k: mapping[k] for k in ("data", "tokenizer")})
    config.tokenizer.loss.disc_start = 0
    config.tokenizer.loss.gan_weight = config.tokenizer.loss.gan_weight or 0.1  # the CPU preset has none
    config.tokenizer.loss.perceptual_weight = config.tokenizer.loss.perceptual_weight or 1.0
    config.tokenizer.train.batch_size, config.tokenizer.train.mixed_precision = sizes.tokenizer_batch, precision
    resolution = config.tokenizer.model.resolution
    data = SyntheticImages(sizes.tokenizer_batch * 2, resolution), SyntheticImages(2, resolution)
    accelerator = training.make_accelerator(config.tokenizer.train, folder)
    parts = train_tokenizer.build_parts(config, data, accelerator)
    seconds, nonfinite = timed_steps(accelerator, parts, train_tokenizer.train_step, config.tokenizer.train, sizes)
    return {"resolution": resolution, "batch": sizes.tokenizer_batch, "precision": precision,
            "parameters": sum(p.numel() for p in parts.model.parameters()),
            "step": "generator (L2/L1 + LPIPS random trunk + VQ + hinge GAN) + discriminator step",
            "images_per_s": round(sizes.tokenizer_batch / seconds, 2), "seconds_per_step": round(seconds, 4),
            "peak_memory_gib": peak_memory_gib(accelerator.device), "nonfinite_loss": nonfinite}


def synthetic_codes(folder: Path, prior_config, count: int) -> Path:
    manifest = CodesManifest(tokenizer_fingerprint="synthetic", code_shape=(prior_config.code_height,
                             prior_config.code_width), codebook_size=prior_config.codebook_size,
                             num_classes=prior_config.num_classes, split="train", num_items=count)
    writer = CodeShardWriter(folder, manifest)
    generator = torch.Generator().manual_seed(0)
    writer.write_shard(0, torch.randint(prior_config.codebook_size, (count, *manifest.code_shape),
                                        generator=generator), torch.arange(count) % prior_config.num_classes)
    writer.finalize()
    return folder


def model_flops_per_token(prior) -> float:
    """PaLM (Chowdhery et al. 2022, appendix B): 6 N + 12 L H Q T, N the non-embedding parameters."""
    c = prior.config
    embedding = prior.llama.model.embed_tokens.weight.numel()
    n = prior.num_parameters() - embedding
    return 6 * n + 12 * c.num_layers * c.hidden_size * c.num_tokens


def check_prior(sizes: Sizes, folder: Path, precision: str) -> tuple[dict, object]:
    mapping = load_preset(sizes.preset)
    run = build_config(train_prior.TrainPriorConfig, {"prior": mapping["prior"]})
    model_config = preset_models(sizes.preset, sizes.classes)[1]
    train = run.prior.train
    train.batch_size, train.mixed_precision = sizes.prior_batch, precision
    codes = synthetic_codes(folder / "codes", model_config, sizes.prior_batch * 2)
    accelerator = training.make_accelerator(train, folder / "prior")
    bound = train_prior.bind_to_codes(model_config, codes)
    datasets = train_prior.load_codes(codes, bound.tokenizer_fingerprint)
    parts = train_prior.build_parts(bound, None, datasets, train, accelerator)  # synthetic codes: no sample grids
    seconds, nonfinite = timed_steps(accelerator, parts, train_prior.train_step, train, sizes)
    prior = accelerator.unwrap_model(parts.model)
    tokens_per_s = sizes.prior_batch * prior.config.num_tokens / seconds
    achieved = tokens_per_s * model_flops_per_token(prior)
    return {"batch": sizes.prior_batch, "tokens": prior.config.num_tokens, "precision": precision,
            "parameters": prior.num_parameters(), "tokens_per_s": round(tokens_per_s, 1),
            "model_flops_per_token": model_flops_per_token(prior), "achieved_tflops": round(achieved / 1e12, 3),
            "peak_memory_gib": peak_memory_gib(accelerator.device), "nonfinite_loss": nonfinite}, prior


def matmul_peak(device: torch.device, size: int, dtype: torch.dtype) -> float:
    """Matmul FLOP/s of this device in the training's dtype, measured: the utilisation's second denominator."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    repeats, start = 10, time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def utilisation(prior_result: dict, device: torch.device) -> dict:
    achieved = prior_result["achieved_tflops"] * 1e12
    dtype = torch.bfloat16 if prior_result["precision"] == "bf16" else torch.float32
    measured = matmul_peak(device, 8192 if device.type == "cuda" else 2048, dtype)
    result = {"matmul_tflops_measured": round(measured / 1e12, 3), "matmul_dtype": str(dtype).removeprefix("torch."),
              "mfu_vs_measured_matmul": round(achieved / measured, 4)}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in DENSE_BF16_PEAK.items() if k in name), None)
        if peak is not None:
            result.update(mfu_vs_datasheet=round(achieved / peak[0], 4), datasheet_peak_tflops=peak[0] / 1e12,
                          datasheet=peak[1])
    return result


@torch.no_grad()
def check_sampling(prior, sizes: Sizes, precision: str) -> dict:
    labels = torch.arange(sizes.samples) % prior.config.num_classes
    device = prior.device
    # eager, as the sample command and the training grids sample (the layers were compiled for training)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"), \
            torch.compiler.set_stance("force_eager"):
        sample(prior, labels[:1], cfg_scale=2.0)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        codes = sample(prior, labels, cfg_scale=2.0, seed=1)
        synchronize(device)
    seconds = time.perf_counter() - start
    return {"images": sizes.samples, "cfg_scale": 2.0, "kv_cache": True,
            "precision": "bf16 autocast" if precision == "bf16" else "fp32",
            "images_per_s": round(sizes.samples / seconds, 3),
            "tokens_per_s": round(sizes.samples * prior.config.num_tokens / seconds, 1),
            "codes_in_range": bool(((codes >= 0) & (codes < prior.config.codebook_size)).all())}


@torch.no_grad()
def check_inception(sizes: Sizes, device: torch.device) -> dict:
    model = load_inception(device=device)
    images = torch.randint(0, 256, (sizes.inception_images, 3, sizes.inception_resolution,
                                    sizes.inception_resolution), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    extract(model, images[:8])  # warm-up
    synchronize(device)
    start, batch, finite = time.perf_counter(), 100, True
    for i in range(0, len(images), batch):
        finite &= bool(torch.isfinite(extract(model, images[i:i + batch]).features).all())
    synchronize(device)
    return {"images": len(images), "resolution": sizes.inception_resolution, "precision": "fp32",
            "images_per_s": round(len(images) / (time.perf_counter() - start), 1), "finite": finite}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="default: bench/results/gpu_check_<device>.json")
    args = parser.parse_args(argv)
    threads = training.configure_threads()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = GPU if device.type == "cuda" else CPU
    # LPIPS's VGG weights are a download; a random trunk costs the same (never report its numbers).
    losses.make_perceptual_loss = lambda weight, net="vgg", random_trunk=False: (
        losses.LPIPSLoss(net, random_trunk=True) if weight > 0 else None)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        # bf16 on the GPU; on a CPU, bf16 only where it computes it (training.resolve_precision's "auto")
        precision = "bf16" if device.type == "cuda" else resolve_precision("auto")[0]
        result = {"benchmark": "gpu_check",
                  "sizes": sizes.__dict__, "torch": torch.__version__, "torch_threads": threads,
                  "tokenizer": check_tokenizer(sizes, Path(tmp) / "tok", precision)}
        result["prior"], prior = check_prior(sizes, Path(tmp), precision)
    result["prior"].update(utilisation(result["prior"], device))
    result["sampling"] = check_sampling(prior, sizes, precision)
    result["inception"] = check_inception(sizes, device)
    result["any_nonfinite_loss"] = result["tokenizer"]["nonfinite_loss"] or result["prior"]["nonfinite_loss"]
    result["seconds"] = round(time.perf_counter() - started, 1)
    out = Path(args.out or f"bench/results/gpu_check_{device.type}.json")
    return write_result(result, out)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
