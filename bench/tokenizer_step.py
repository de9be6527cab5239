"""Images/s and peak memory of one tokenizer training step: ProVQ (mid-ramp) vs hard VQ, fp32 and bf16.

    OMP_NUM_THREADS=2 python -m bench.tokenizer_step [--batch 32] [--gan] [--out PATH]

A step is forward, losses (L1 + VQ; with --gan also the hinge generator loss with
the adaptive weight and a discriminator update), backward and AdamW. The two
variants alternate step by step so that load from other processes hits both
alike; the overhead is the median of the paired step-time ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.results_io import write_result
from provq.pipeline.presets import preset_models
from tokenizer import (
    DiscriminatorConfig,
    PatchDiscriminator,
    ProVQTokenizer,
    ScheduleConfig,
    adaptive_gan_weight,
    hinge_d_loss,
    hinge_g_loss,
    reconstruction_loss,
)

VARIANTS = {"provq": 0.5, "hard_vq": 1.0}  # hardness: mid-ramp for ProVQ, schedule none for VQ


def build(variant: str, gan: bool, disc_channels: int):
    config = preset_models("emoji32", num_classes=10)[0]
    if variant == "hard_vq":
        config.quantizer.schedule = ScheduleConfig(kind="none")
    torch.manual_seed(0)
    model = ProVQTokenizer(config).train()
    disc = PatchDiscriminator(DiscriminatorConfig(base_channels=disc_channels, num_layers=2)).train() if gan else None
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=1e-4) if gan else None
    return model, disc, opt, opt_d


def train_step(state, images, hardness: float, bf16: bool) -> float:
    """One step; its generator-side loss."""
    model, disc, opt, opt_d = state
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(images, hardness)
        rec = reconstruction_loss(out.reconstruction, images)
        loss = rec + out.quantizer.loss
        if disc is not None:
            g_loss = hinge_g_loss(disc(out.reconstruction))
            loss = loss + adaptive_gan_weight(rec, g_loss, model.last_layer) * g_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if disc is not None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            d_loss = hinge_d_loss(disc(images), disc(out.reconstruction.detach()))
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
    return loss.item()


def time_steps(args, bf16: bool) -> dict:
    images = torch.rand(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    states = {v: build(v, args.gan, args.disc_channels) for v in VARIANTS}
    for variant, state in states.items():  # warm-up; the first step runs the k-means init
        for _ in range(args.warmup):
            train_step(state, images, VARIANTS[variant], bf16)
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(args.steps):
        # Single steps in ABBA order: a burst of load from other processes hits both alike.
        for variant in list(VARIANTS) if i % 2 == 0 else list(reversed(VARIANTS)):
            start = time.perf_counter()
            train_step(states[variant], images, VARIANTS[variant], bf16)
            seconds[variant].append(time.perf_counter() - start)
    ratios = [p / h for p, h in zip(seconds["provq"], seconds["hard_vq"], strict=True)]
    result = {v: summarize(seconds[v], args.batch) for v in VARIANTS}
    result["provq_step_overhead_pct"] = round(100 * (statistics.median(ratios) - 1), 2)
    result["provq_step_overhead_pct_of_medians"] = round(
        100 * (statistics.median(seconds["provq"]) / statistics.median(seconds["hard_vq"]) - 1), 2)
    return result


def summarize(seconds: list[float], batch: int) -> dict:
    return {
        "images_per_s_median": round(batch / statistics.median(seconds), 1),
        "images_per_s_best": round(batch / min(seconds), 1),
        "images_per_s_worst": round(batch / max(seconds), 1),
    }


def _rss_mib() -> dict:
    """Current and peak resident memory of this process (Linux /proc; peak via getrusage elsewhere)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return {"now": int(fields["VmRSS"].split()[0]) / 1024, "peak": int(fields["VmHWM"].split()[0]) / 1024}
    except (OSError, KeyError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"now": float("nan"), "peak": peak}


def peak_rss_child(args) -> None:
    """Run in a fresh process: a few steps of one configuration; print its memory in MiB."""
    variant, precision = args.child.split(",")
    images = torch.rand(args.batch, 3, 32, 32) * 2 - 1
    before = _rss_mib()  # importing torch + diffusers alone peaks above a demo step
    state = build(variant, args.gan, args.disc_channels)
    for _ in range(3):
        train_step(state, images, VARIANTS[variant], precision == "bf16")
    after = _rss_mib()
    print(json.dumps({
        "peak_rss_mib": round(after["peak"], 1),
        "rss_after_imports_mib": round(before["now"], 1),
        "rss_after_steps_mib": round(after["now"], 1),
    }))


def peak_rss(args, variant: str, precision: str) -> dict:
    command = [sys.executable, "-m", "bench.tokenizer_step", "--child", f"{variant},{precision}", "--batch", str(args.batch),
               "--disc_channels", str(args.disc_channels)]
    command += ["--gan"] if args.gan else []
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--gan", action="store_true", help="add the discriminator to the step")
    parser.add_argument("--disc_channels", type=int, default=64, help="with --gan: base channels")
    parser.add_argument("--no_memory", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--out", default="bench/results/tokenizer_step.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return peak_rss_child(args)
    result = {
        "benchmark": "tokenizer_step", "preset": "emoji32", "batch": args.batch,
        "step": "forward + L1 + VQ loss"
        + (f" + hinge GAN (adaptive weight) + D step (PatchGAN, 2 layers, {args.disc_channels} ch)"
           if args.gan else "")
        + " + backward + AdamW",
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "timed_steps": args.steps, "load_average_before": os.getloadavg(), "results": {},
    }
    for precision in args.precisions.split(","):
        entry = time_steps(args, bf16=precision == "bf16")
        if not args.no_memory:
            for variant in VARIANTS:
                entry[variant].update(peak_rss(args, variant, precision))
        result["results"][precision] = entry
    result["load_average_after"] = os.getloadavg()  # other processes on the machine skew timings
    write_result(result, args.out)


if __name__ == "__main__":
    main()
