"""The library: load a tokenizer and a prior, sample images, encode and decode, rFID and gFID.

    import provq

    tok = provq.load_tokenizer("runs/demo/tokenizer/tokenizer")           # a folder or a hub id
    prior = provq.load_prior("runs/demo/prior/prior", tokenizer=tok)       # refuses another tokenizer's prior
    images = provq.generate(tok, prior, labels=[0, 1, 2], seed=0)          # (3, 3, H, W) in [-1, 1]
    codes = tok.encode(images)                                             # (3, h, w) code ids
    same = tok.decode(codes)
    metrics = provq.rfid("runs/demo/tokenizer/tokenizer", dataset="emoji")  # {"rfid": ..., "psnr": ...}

Sampling settings are ``SamplingConfig``'s (``cfg_scale``, ``temperature``, ``top_k``, ``top_p``),
given as keywords or as a ``SamplingConfig``; the CFG scale's one default is
``generator.sampling.DEFAULT_CFG_SCALE`` (2.0) for a class-conditional prior, 1 for a prior of
unlabelled data. The commands (``provq-sample``, ``python -m eval``) call these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from generator import ARPrior
from generator.sampling import DEFAULT_CFG_SCALE, SamplingConfig, sample
from tokenizer import ProVQTokenizer

__all__ = ["DEFAULT_CFG_SCALE", "SamplingConfig", "load_tokenizer", "load_prior", "generate", "rfid", "gfid"]


def load_tokenizer(path: str | Path, device: str | torch.device | None = None) -> ProVQTokenizer:
    """A ProVQ tokenizer from a folder (config.json + model.safetensors) or a hub id, in eval mode."""
    return ProVQTokenizer.from_pretrained(str(path), device=device or "cpu").eval()


def load_prior(path: str | Path, tokenizer: ProVQTokenizer | None = None,
               device: str | torch.device | None = None) -> ARPrior:
    """An autoregressive prior from a folder or a hub id, in eval mode; with ``tokenizer``, a prior
    trained on another tokenizer's codes is refused (its codes would decode to noise)."""
    prior = ARPrior.from_pretrained(str(path), device=device or "cpu").eval()
    if tokenizer is not None:
        prior.check_tokenizer(tokenizer.fingerprint())
    return prior


@torch.no_grad()
def generate(tokenizer: ProVQTokenizer, prior: ARPrior, labels: Sequence[int] | torch.Tensor, *, seed: int = 0,
             sampling: SamplingConfig | None = None, **settings) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] for class ``labels`` (B,): -1 is "no class", and every label of a
    prior of unlabelled data. ``settings`` (cfg_scale, temperature, top_k, top_p) override ``sampling``."""
    chosen = {**(asdict(sampling) if sampling is not None else {}), **settings}
    return tokenizer.decode(sample(prior, labels, seed=seed, **chosen))


def _eval(command: str, **options) -> dict:
    """``python -m eval <command>`` with ``options`` as its flags (True: a bare flag), without printing."""
    from eval.__main__ import evaluate

    argv = [command]
    for name, value in options.items():
        if value is None or value is False:
            continue
        argv += [f"--{name}"] if value is True else [f"--{name}", str(value)]
    return evaluate(argv)


def rfid(tokenizer: str | Path, dataset: str = "emoji", split: str = "test", **options) -> dict:
    """Reconstruction FID, PSNR, SSIM, LPIPS and codebook usage of a tokenizer folder on a dataset split
    (``options``: the flags of ``python -m eval rfid``, e.g. ``lpips_net="none"``, ``resolution=64``).
    Returns the command's JSON as a dict; its ``metrics`` hold the numbers."""
    return _eval("rfid", tokenizer=tokenizer, dataset=dataset, split=split, **options)


def gfid(samples: str | Path, ref: str | Path, **options) -> dict:
    """Generation FID (and IS) of samples (a .npz or a folder) against reference statistics or images
    (``options``: the flags of ``python -m eval gfid``, e.g. ``precision_recall=True``)."""
    return _eval("gfid", samples=samples, ref=ref, **options)
