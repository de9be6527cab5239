"""The study's tokenizer training step in channels_last against the default (contiguous) layout, side by
side: emoji32's model at 32 px, batch 32, mid-ramp (h = 0.5), forward + L1 + quantizer loss + backward +
AdamW, one thread; the two layouts alternate step by step (ABBA) so that load hits both alike.

    OMP_NUM_THREADS=1 python -m bench.channels_last [--steps 16] [--out bench/results/channels_last.json]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.results_io import write_result
from bench.tokenizer_step import build, train_step

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def step(state, images, bf16: bool) -> tuple[float, float]:
    """bench.tokenizer_step's training step at mid-ramp: its seconds and its loss."""
    start = time.perf_counter()
    loss = train_step(state, images, 0.5, bf16)
    return time.perf_counter() - start, loss


def compare(bf16: bool, steps: int, warmup: int) -> dict:
    images = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batches = {name: images.contiguous(memory_format=layout) for name, layout in LAYOUTS.items()}
    states = {name: build("provq", False, 0) for name in LAYOUTS}
    for name, layout in LAYOUTS.items():
        states[name][0].to(memory_format=layout)  # in place: the optimizer keeps its parameters
    first_loss = {}
    for name in LAYOUTS:  # the first step runs the k-means init
        first_loss[name] = step(states[name], batches[name], bf16)[1]
        for _ in range(warmup - 1):
            step(states[name], batches[name], bf16)
    seconds = {name: [] for name in LAYOUTS}
    for i in range(steps):
        for name in list(LAYOUTS) if i % 2 == 0 else list(reversed(LAYOUTS)):
            seconds[name].append(step(states[name], batches[name], bf16)[0])
    ratios = [a / b for a, b in zip(seconds["contiguous"], seconds["channels_last"], strict=True)]
    return {**{f"{name}_step_s_median": round(statistics.median(s), 4) for name, s in seconds.items()},
            "channels_last_speedup": round(statistics.median(ratios), 3),
            "first_step_loss": first_loss}  # the same function in both layouts: equal up to rounding


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16, help="timed steps per layout")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per layout, at least 1")
    parser.add_argument("--precisions", default="bf16,fp32")
    parser.add_argument("--out", default="bench/results/channels_last.json")
    args = parser.parse_args(argv)
    result = {"benchmark": "channels_last", "preset": "emoji32", "batch": 32, "hardness": 0.5,
              "timed_steps": args.steps, "speedup": "median of paired step-time ratios, contiguous / channels_last",
              "results": {p: compare(p == "bf16", args.steps, args.warmup) for p in args.precisions.split(",")}}
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
