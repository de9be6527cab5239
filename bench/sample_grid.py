"""The sample grid a prior training run writes (train_prior.write_samples), when the run compiled its
decoder layers (train.compile, the demo preset's default): sampled through the compiled layers, as before,
against the same layers forced eager (torch.compiler.set_stance("force_eager"), as write_samples does now).

    OMP_NUM_THREADS=1 python -m bench.sample_grid [--preset emoji32] [--inductor_cache fresh|shared]
                                                  [--out bench/results/sample_grid.json]

The demo prior (random weights: speed does not depend on them), its training step compiled first as a
run's first step compiles it; then each arm samples the grid twice (a run writes one every image_every
steps: the demo writes two). Compiled, the first grid pays for compiling the KV-cached decode shapes. Both
arms run in one process, eager first, and must give the same codes. fp32 (no autocast): on a CPU with bf16
units the demo's grids sample under bf16 autocast, not measured here. Inductor's compile cache is a fresh
empty directory by default, as on a new machine or after a change to the prior's shapes (--inductor_cache
shared: the user's cache, warm from earlier runs, where the compiled arm's extra compile costs much less).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from bench.results_io import write_result
from generator import ARPrior, sample
from provq import training
from provq.commands.train_prior import TrainPriorConfig
from provq.common.presets import load_preset
from provq.common.typed_config import build_config
from provq.pipeline.presets import preset_models


def timed_grid(prior: ARPrior, labels: torch.Tensor, stance: str) -> tuple[float, torch.Tensor]:
    started = time.perf_counter()
    with torch.compiler.set_stance(stance):
        codes = sample(prior, labels, cfg_scale=2.0, seed=0)
    return time.perf_counter() - started, codes


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="emoji32")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--inductor_cache", choices=("fresh", "shared"), default="fresh")
    parser.add_argument("--out", default="bench/results/sample_grid.json")
    args = parser.parse_args(argv)
    if args.inductor_cache == "fresh":  # read by inductor at each compile: set before the first one
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="sample_grid_inductor_")
    threads = training.configure_threads()
    train = build_config(TrainPriorConfig, {"prior": load_preset(args.preset)["prior"]}).prior.train
    torch.manual_seed(0)
    prior = ARPrior(preset_models(args.preset, args.classes)[1])
    labels = torch.arange(min(args.classes, 10)).repeat_interleave(train.grid_per_class)  # write_samples' rows
    for layer in prior.llama.model.layers:  # as train_prior.build_parts does with train.compile
        layer.compile()
    codes = torch.randint(prior.config.codebook_size, (train.batch_size, prior.config.code_height,
                                                       prior.config.code_width))
    started = time.perf_counter()
    prior(codes, torch.arange(train.batch_size) % args.classes, generator=torch.Generator().manual_seed(0)).loss.backward()
    first_step = time.perf_counter() - started
    arms, grids = {}, {}
    for name, stance in (("force_eager", "force_eager"), ("compiled", "default")):
        seconds = []
        for _ in range(2):
            elapsed, grids[name] = timed_grid(prior, labels, stance)
            seconds.append(round(elapsed, 2))
        arms[name] = {"first_grid_s": seconds[0], "second_grid_s": seconds[1], "two_grids_s": round(sum(seconds), 2)}
    return write_result({
        "benchmark": "sample_grid", "preset": args.preset, "grid_images": len(labels), "cfg_scale": 2.0,
        "inductor_cache": args.inductor_cache, "torch_threads": threads, "compiled_training_step_s": round(first_step, 2), "arms": arms,
        "same_codes": torch.equal(grids["force_eager"], grids["compiled"]),
        "two_grids_saved_s": round(arms["compiled"]["two_grids_s"] - arms["force_eager"]["two_grids_s"], 2),
    }, args.out)


if __name__ == "__main__":
    main()
