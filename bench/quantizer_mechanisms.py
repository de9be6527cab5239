"""Seconds and peak memory of one quantizer step per mechanism at a preset's shapes: soft and gumbel
(the codebook mixture, computed in chunks of rows) against interpolate.

    OMP_NUM_THREADS=1 python -m bench.quantizer_mechanisms [--preset imagenet256] [--steps 4]

A step is the quantizer's forward at h = 0.5 on one process's batch of encoder latents (the
preset's batch size and code grid, its latent channels), the loss z_out^2 + the quantizer's loss,
and its backward (no optimizer: the encoder and decoder are the same for every mechanism). The
mechanisms alternate step by step so that load from other processes hits them alike.

Memory is the resident set's high-water mark over 3 steps above what the process held before
them (Linux; the mark is reset through /proc/self/clear_refs). `live`: glibc's mmap threshold
fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_), so every freed tensor goes back to the system and the
mark is the peak of live tensors; one process measures every variant in turn. `default`: glibc's
own settings, one process per variant, the memory a CPU run would see (freed blocks may stay in the
heap). `soft_one_chunk` is the same mixture with all rows in one chunk, and `soft_autograd` the
formula written with whole (rows x codes) matrices and plain autograd: what the chunking saves.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.results_io import write_result
from provq.common.presets import load_preset, preset_section
from tokenizer import quantizer as quantizer_module
from tokenizer.model import TokenizerConfig
from tokenizer.quantizer import ProgressiveQuantizer

TIMED = ("interpolate", "soft", "gumbel")
MEMORY_LIVE = ("interpolate", "soft", "gumbel", "soft_one_chunk", "soft_autograd")
MEMORY_DEFAULT = ("interpolate", "soft")
HARDNESS = 0.5
CHUNKED_MIXTURE = quantizer_module.codebook_mixture


def whole_matrix_mixture(rows, codes, temperature, generator=None):
    """The oracle's formula on whole matrices: autograd keeps the (rows x codes) ones for backward."""
    return torch.softmax(-torch.cdist(rows, codes).pow(2) / temperature, dim=-1) @ codes


def one_chunk_mixture(rows, codes, temperature, generator=None):
    return CHUNKED_MIXTURE(rows, codes, temperature, generator, chunk_rows=rows.shape[0])


MIXTURES = {"soft_one_chunk": one_chunk_mixture, "soft_autograd": whole_matrix_mixture}


def build(preset: str, variant: str):
    """(quantizer, latents) at the preset's shapes; the k-means init off (it is not the step's cost).
    Sets the mixture the quantizer calls (the chunked one unless the variant names another)."""
    model = preset_section(preset, "tokenizer.model", TokenizerConfig)
    mechanism = "soft" if variant in MIXTURES else variant
    config = replace(model.quantizer, mechanism=mechanism, kmeans_init=False)
    torch.manual_seed(0)
    quantizer = ProgressiveQuantizer(model.latent_channels, config).train()
    batch = load_preset(preset)["tokenizer"]["train"]["batch_size"]
    height, width = model.code_shape
    latents = torch.randn(batch, model.latent_channels, height, width, generator=torch.Generator().manual_seed(0))
    quantizer_module.codebook_mixture = MIXTURES.get(variant, CHUNKED_MIXTURE)
    return quantizer, latents


def step(quantizer: ProgressiveQuantizer, latents: torch.Tensor, seed: int) -> None:
    z = latents.clone().requires_grad_(True)
    out = quantizer(z, HARDNESS, torch.Generator().manual_seed(seed))
    (out.z_out.square().mean() + out.loss).backward()
    quantizer.zero_grad(set_to_none=True)


def time_steps(args) -> dict:
    states = {v: build(args.preset, v) for v in TIMED}
    for state in states.values():
        step(*state, seed=0)  # warm-up
    seconds: dict[str, list[float]] = {v: [] for v in TIMED}
    for i in range(args.steps):
        order = TIMED[i % len(TIMED):] + TIMED[: i % len(TIMED)]  # each goes first in turn
        for variant in order:
            start = time.perf_counter()
            step(*states[variant], seed=i)
            seconds[variant].append(time.perf_counter() - start)
    result = {v: {"seconds_median": round(statistics.median(s), 4), "seconds_best": round(min(s), 4)}
              for v, s in seconds.items()}
    for variant in ("soft", "gumbel"):
        ratios = [a / b for a, b in zip(seconds[variant], seconds["interpolate"], strict=True)]
        result[variant]["vs_interpolate_median_ratio"] = round(statistics.median(ratios), 2)
    return result


def _status_mib() -> dict:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {"now": int(fields["VmRSS"].split()[0]) / 1024, "peak": int(fields["VmHWM"].split()[0]) / 1024}


def memory_child(args) -> None:
    """In this process, each variant named by --child in turn: 3 steps; print their memory in MiB."""
    found = {}
    for variant in args.child.split(","):
        quantizer, latents = build(args.preset, variant)
        step(quantizer, latents, seed=0)  # first-touch allocations (thread pools, codebook grads)
        before = _status_mib()["now"]
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
        for seed in range(1, 4):
            step(quantizer, latents, seed)
        found[variant] = {"rss_before_steps_mib": round(before, 1),
                          "step_peak_above_before_mib": round(_status_mib()["peak"] - before, 1)}
        del quantizer, latents
    print(json.dumps(found))


def peak_memory(args, variants: tuple[str, ...], live: bool) -> dict:
    env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if live else {})}
    command = [sys.executable, "-m", "bench.quantizer_mechanisms", "--preset", args.preset, "--child", ",".join(variants)]
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="imagenet256")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per mechanism")
    parser.add_argument("--no_memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--out", default=None, help="default bench/results/quantizer_mechanisms_<preset>.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return memory_child(args)
    model = preset_section(args.preset, "tokenizer.model", TokenizerConfig)
    q = model.quantizer
    result = {
        "benchmark": "quantizer_mechanisms", "preset": args.preset,
        "batch_per_process": load_preset(args.preset)["tokenizer"]["train"]["batch_size"],
        "code_grid": list(model.code_shape), "latent_channels": model.latent_channels,
        "codebook": [q.codebook_size, q.codebook_dim], "l2_normalize": q.l2_normalize, "hardness": HARDNESS,
        "step": "quantizer forward + mean z_out^2 + quantizer loss + backward (fp32)",
        "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "timed_steps": args.steps,
        "load_average_before": os.getloadavg(), "seconds": time_steps(args),
    }
    if not args.no_memory:
        result["memory_live"] = peak_memory(args, MEMORY_LIVE, live=True)
        result["memory_default"] = {k: v for variant in MEMORY_DEFAULT
                                    for k, v in peak_memory(args, (variant,), live=False).items()}
    result["load_average_after"] = os.getloadavg()  # other processes on the machine skew timings
    write_result(result, args.out or f"bench/results/quantizer_mechanisms_{args.preset}.json")


if __name__ == "__main__":
    main()
