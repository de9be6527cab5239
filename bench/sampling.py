"""Sampling speed of the prior on CPU: KV cache vs recomputing, vs transformers' generate, CFG cost (LlamaGen shapes).

    OMP_NUM_THREADS=2 python -m bench.sampling [--out bench/results/sampling.json]

Weights are random: speed does not depend on them. Every figure is the best of interleaved
repeats (the CPU may be shared). GPT-B is slow on a CPU, so its comparisons (generate, CFG,
no cache) are timed over the first tokens of the raster only; the JSON says how many tokens
each figure covers, and the cost of recomputing all 256 is an estimate, labelled as such.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import transformers

from bench.results_io import write_result
from generator import ARPrior, sample
from provq.pipeline.presets import preset_models

# The priors benchmarked: the demo's (emoji, 10 classes) and GPT-B of the ImageNet recipe.
PRIORS = {"demo": ("emoji32", 10), "gpt_b": ("imagenet256", 1000)}


def prior_config(name: str):
    return preset_models(*PRIORS[name])[1]

SETTINGS = dict(temperature=1.0, top_k=0, top_p=1.0)  # the same for our sampler and generate
CFG_SCALE = 2.0


def first_tokens(prior: ARPrior, num_tokens: int) -> ARPrior:
    """The same model (shared weights) sampling only the first num_tokens codes in raster order."""
    if num_tokens >= prior.config.num_tokens:
        return prior
    view = copy.copy(prior)  # shallow: the Llama modules are shared, only the config differs
    view.config = dataclasses.replace(prior.config, code_height=1, code_width=num_tokens)
    return view


def best_times(runs: dict, repeats: int) -> dict[str, float]:
    """Best of `repeats` wall times per run, interleaved: the CPU is shared, so load drifts
    over time and the minimum is the least disturbed figure."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def run_generate(prior: ARPrior, labels: torch.Tensor, cache: str | None = None) -> torch.Tensor:
    """transformers' own sampling loop on the same Llama, class token as the prompt, no CFG;
    cache=None is generate's default (dynamic) cache, "static" the one our sampler uses."""
    c = prior.config
    prompt = prior.class_tokens(labels)[:, None]
    torch.manual_seed(0)  # generate draws from the global RNG: fix it for repeatable runs
    return prior.llama.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
        max_new_tokens=c.num_tokens, min_new_tokens=c.num_tokens, cache_implementation=cache,
        # generate samples from the whole vocabulary; class and null tokens are masked out
        suppress_tokens=list(range(c.codebook_size, c.vocab_size)), **SETTINGS)


def figure(seconds: float, batch: int, tokens: int, **extra) -> dict:
    return {"seconds": round(seconds, 3), "tokens": tokens,
            "tokens_per_s": round(batch * tokens / seconds, 2), **extra}


@torch.no_grad()
def recompute_estimate(prior: ARPrior, labels: torch.Tensor, repeats: int) -> float:
    """Seconds to sample all N tokens without a cache, from the cost of its last step (a full
    N-token pass), assuming step cost grows linearly with the prefix: last * (N + 1) / 2."""
    n = prior.config.num_tokens
    prefix = torch.cat([prior.class_tokens(labels)[:, None],
                        torch.zeros(len(labels), n - 1, dtype=torch.long)], dim=1)
    last = best_times({"last": lambda: prior.next_token_logits(prefix)}, repeats)["last"]
    return last * (n + 1) / 2


def bench_model(name: str, batch: int, compare: int, no_cache: int, repeats: int) -> dict:
    """All figures for one preset; compare/no_cache: codes timed for those runs (<= N)."""
    torch.manual_seed(0)
    prior = ARPrior(prior_config(name)).eval()
    n = prior.config.num_tokens
    labels = torch.arange(batch) % prior.config.num_classes
    sample(first_tokens(prior, 4), labels)  # warm-up: allocator, thread pool, lazy imports

    def ours(num, **kw):
        view = first_tokens(prior, num)
        return lambda: sample(view, labels, **SETTINGS, **kw)

    t = best_times({
        "kv_cache": ours(n), "kv_cache_compare": ours(compare),
        "cfg": ours(compare, cfg_scale=CFG_SCALE),
        "generate": lambda: run_generate(first_tokens(prior, compare), labels),
        "generate_static": lambda: run_generate(first_tokens(prior, compare), labels, "static"),
        "kv_cache_no_cache_span": ours(no_cache), "no_cache": ours(no_cache, use_cache=False),
    }, repeats)
    result = {
        "preset": name, "parameters": prior.num_parameters(), "batch": batch, "code_tokens": n,
        "repeats": repeats,
        "kv_cache": figure(t["kv_cache"], batch, n),
        "kv_cache_first_tokens": figure(t["kv_cache_compare"], batch, compare),
        "generate": figure(t["generate"], batch, compare),
        "generate_static_cache": figure(t["generate_static"], batch, compare),
        "cfg": figure(t["cfg"], batch, compare, cfg_scale=CFG_SCALE),
        "no_cache": figure(t["no_cache"], batch, no_cache),
        "kv_cache_same_tokens_as_no_cache": figure(t["kv_cache_no_cache_span"], batch, no_cache),
        "kv_cache_speedup": round(t["no_cache"] / t["kv_cache_no_cache_span"], 2),
        "ours_vs_generate_speed": round(t["generate"] / t["kv_cache_compare"], 2),
        "ours_vs_generate_static_cache_speed": round(t["generate_static"] / t["kv_cache_compare"], 2),
        "cfg_cost_ratio": round(t["cfg"] / t["kv_cache_compare"], 2),
    }
    if no_cache < n:
        estimate = recompute_estimate(prior, labels, repeats)
        result["no_cache_all_tokens_estimate"] = figure(estimate, batch, n, estimated=True)
        result["kv_cache_speedup_all_tokens_estimate"] = round(estimate / t["kv_cache"], 2)
    return result


def targets(result: dict) -> dict:
    speedup = result.get("kv_cache_speedup_all_tokens_estimate", result["kv_cache_speedup"])
    return {"kv_cache_at_least_5x": speedup >= 5.0,
            "no_slower_than_generate": result["ours_vs_generate_speed"] >= 1.0,
            "cfg_at_most_2.1x": result["cfg_cost_ratio"] <= 2.1}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/sampling.json")
    parser.add_argument("--presets", default="demo,gpt_b")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--demo_repeats", type=int, default=5)
    parser.add_argument("--gpt_b_repeats", type=int, default=3)
    parser.add_argument("--gpt_b_compare_tokens", type=int, default=32,
                        help="codes over which GPT-B's generate and CFG comparisons are timed")
    parser.add_argument("--gpt_b_no_cache_tokens", type=int, default=16,
                        help="recomputing the prefix is quadratic: time only the first codes")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    results = {
        "threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "settings": SETTINGS, "load_average_before": os.getloadavg(), "models": {},
    }
    for name in args.presets.split(","):
        n = prior_config(name).num_tokens
        if name == "demo":
            result = bench_model(name, args.batch, n, n, args.demo_repeats)
        else:
            result = bench_model(name, args.batch, min(n, args.gpt_b_compare_tokens),
                                 min(n, args.gpt_b_no_cache_tokens), args.gpt_b_repeats)
        result["targets_met"] = targets(result)
        results["models"][name] = result
        print(f"[bench] {name}: {json.dumps(result)}", file=sys.stderr, flush=True)
    results["load_average_after"] = os.getloadavg()  # other work on the CPU skews figures
    out = Path(args.out)
    return write_result(results, out)


if __name__ == "__main__":
    main()
