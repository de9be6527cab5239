"""Prior training throughput and model-FLOPs utilisation against this machine's bf16 matmul rate.

    OMP_NUM_THREADS=2 python -m bench.prior_step [--steps 20] [--out bench/results/prior_step.json]

Through train_prior.py's own step (forward, cross-entropy, backward, clip, AdamW) on random codes,
for the demo prior (configs/emoji32.yaml: 8x8 codes of 1,024, batch 64) and GPT-B
(configs/imagenet256.yaml: 16x16 codes of 16,384, batch 8, and a 4-layer slice of it), eager and
compiled (train.compile). Utilisation = model FLOPs (PaLM: 6 N + 12 L H Q T per token) per second
over a bf16 2048 x 2048 matmul's FLOP/s measured in the same run, interleaved with the steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.gpu_check import matmul_peak, model_flops_per_token, synthetic_codes
from bench.results_io import write_result
from provq import training
from provq.commands import train_prior
from provq.common.presets import load_preset
from provq.common.typed_config import build_config
from provq.pipeline.presets import preset_models

MODELS = {"demo": ("emoji32", 10, 64, {}), "gpt_b": ("imagenet256", 1000, 8, {}),
          "gpt_b_4_layers": ("imagenet256", 1000, 8, {"num_layers": 4})}


def measure(name: str, compiled: bool, args, folder: Path) -> dict:
    preset, classes, batch, changes = MODELS[name]
    model_config = replace(preset_models(preset, classes)[1], **changes)
    train = build_config(train_prior.TrainPriorConfig, {"prior": load_preset(preset)["prior"]}).prior.train
    train = replace(train, batch_size=batch, mixed_precision="bf16", compile=compiled)
    codes = synthetic_codes(folder / f"{name}_{compiled}", model_config, batch * 4)
    accelerator = training.make_accelerator(train, folder)
    bound = train_prior.bind_to_codes(model_config, codes)
    datasets = train_prior.load_codes(codes, bound.tokenizer_fingerprint)
    parts = train_prior.build_parts(bound, None, datasets, train, accelerator)  # synthetic codes: no sample grids
    batches = iter(training.reproducibility.batches(parts.train_loader, accelerator, 0))
    seconds, peaks = [], []
    started = time.perf_counter()
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        with accelerator.accumulate(*parts.accumulated()):
            train_prior.train_step(parts, next(batches), training.StepContext(step, step, accelerator, train))
        if step >= args.warmup:
            seconds.append(time.perf_counter() - start)
            if step % 5 == 0:
                peaks.append(matmul_peak(torch.device("cpu"), 2048))
        elif step == 0:
            first_step = time.perf_counter() - started
    prior = accelerator.unwrap_model(parts.model)
    tokens_per_s = batch * prior.config.num_tokens / statistics.median(seconds)
    achieved = tokens_per_s * model_flops_per_token(prior)
    return {"batch": batch, "tokens": prior.config.num_tokens, "layers": prior.config.num_layers,
            "parameters": prior.num_parameters(), "compiled": compiled,
            "first_step_seconds": round(first_step, 1), "tokens_per_s": round(tokens_per_s, 1),
            "model_gflops_per_s": round(achieved / 1e9, 1),
            "matmul_bf16_gflops_per_s": round(statistics.median(peaks) / 1e9, 1),
            "utilisation": round(achieved / statistics.median(peaks), 3)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--models", default="demo,gpt_b_4_layers,gpt_b")
    parser.add_argument("--out", default="bench/results/prior_step.json")
    args = parser.parse_args(argv)
    threads = training.configure_threads()
    result = {"benchmark": "prior training step (train_prior.train_step), bf16", "torch_threads": threads,
              "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(),
              "torch": torch.__version__,
              "load_average_before": os.getloadavg(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            result["models"][name] = {mode: measure(name, mode == "compiled", args, Path(tmp))
                                      for mode in ("eager", "compiled")}
    result["load_average_after"] = os.getloadavg()
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
