"""Randomness and data order as pure functions of (seed, step, rank): a resumed run replays both."""

from __future__ import annotations

import torch
from accelerate.utils import set_seed

from provq.common.errors import UserError


def _step_seed(seed: int, step: int, rank: int, stream: int = 0) -> int:
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729 + stream * 15_485_863) % (2**63 - 1)


def step_generator(seed: int, step: int, rank: int, device="cpu") -> torch.Generator:
    """Training randomness (label dropout, the stochastic mask) as a function of (seed, step, rank)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(_step_seed(seed, step, rank))
    return gen


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed the global RNGs (torch, numpy, python) from (seed, step, rank) before a micro-step.

    Anything that draws from them (dropout, a library's augmentation) is then replayed
    exactly by a resumed run, although the data loader draws from the global torch RNG
    each time it starts an epoch and a resumed run starts one more.
    """
    set_seed(_step_seed(seed, step, rank, stream=1) % 2**32)


def batches(dataloader, accelerator, start_step: int, grad_accum_steps: int = 1):
    """Endless micro-batches, starting exactly where step ``start_step`` left off."""
    per_epoch = len(dataloader)
    if per_epoch == 0:
        raise UserError("the training data loader is empty: the split has fewer images than one batch "
                        "(lower train.batch_size or add images)")
    epoch, skip = divmod(start_step * grad_accum_steps, per_epoch)
    while True:
        dataloader.set_epoch(epoch)
        if hasattr(dataloader.dataset, "set_epoch"):
            dataloader.dataset.set_epoch(epoch)
        loader = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        yield from loader
        epoch, skip = epoch + 1, 0
