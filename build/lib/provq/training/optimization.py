"""Optimisation: the LR schedule as a pure function of the step, gradient clipping, divergence stops."""

from __future__ import annotations

import math

import torch

from provq.common.errors import UserError
from provq.training.config import TrainConfig

_RESUME_HINT = "The last good checkpoint is untouched: lower the LR or use fp32, then --resume latest."


class DivergenceError(UserError, RuntimeError):
    """A loss or gradient became NaN or inf; the run stops before the bad update."""


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR factor: linear warmup, then cosine decay to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer, base_lr: float, step: int, train: TrainConfig) -> None:
    """Warmup + cosine LR as a pure function of the step.

    No scheduler state: resuming and the number of processes cannot change it
    (Accelerate's prepared schedulers step once per process).
    """
    factor = warmup_cosine(step, train.warmup_steps, train.max_steps, train.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = base_lr * factor


def check_finite(step: int, **terms) -> None:
    """Stop on the first NaN/inf term, naming it; the last good checkpoint stays."""
    for name, value in terms.items():
        if value is None:
            continue
        tensor = value if torch.is_tensor(value) else torch.tensor(float(value))
        if not torch.isfinite(tensor).all():
            value = tensor.detach().float().flatten()[0].item()
            raise DivergenceError(f"step {step}: '{name}' is {value}; stopping. {_RESUME_HINT}")


def check_grad_norm(step: int, norm, name: str = "model") -> None:
    """Stop before the update when the gradient norm is NaN or inf."""
    if norm is not None and not math.isfinite(float(norm)):
        raise DivergenceError(f"step {step}: the {name}'s gradient norm is {float(norm)}; "
                              f"stopping before the update. {_RESUME_HINT}")


def make_optimizer(module: torch.nn.Module, train: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """Adam or AdamW over ``module``'s parameters. With ``weight_decay_1d`` off, tensors of fewer than
    2 dimensions (biases, norm scales) get no weight decay, as LlamaGen's GPT optimizer groups them."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = params if train.weight_decay_1d else [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    kind = torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.Adam
    return kind(groups, lr=lr, betas=(train.beta1, train.beta2), weight_decay=train.weight_decay)


def clip_and_check(module, optimizer, ctx, name: str) -> None:
    """Clip ``module``'s gradients (grad_clip 0: measure only) and stop on a NaN/inf norm before the
    update. Under fp16 only this optimizer's gradients are unscaled (each optimizer exactly once per
    step), and the scaler owns non-finite gradients (it skips that step), so no check there."""
    accelerator, train = ctx.accelerator, ctx.train
    if not accelerator.sync_gradients:
        return
    max_norm = train.grad_clip if train.grad_clip > 0 else float("inf")
    if accelerator.distributed_type.value in ("DEEPSPEED", "FSDP", "XLA"):
        norm = accelerator.clip_grad_norm_(module.parameters(), max_norm)  # they clip their own way
    else:
        # Accelerate's clip_grad_norm_ would unscale every prepared optimizer, the other stage's too.
        accelerator.unscale_gradients(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)
    if accelerator.scaler is None:
        check_grad_norm(ctx.step, norm, name)


def optimizer_step(optimizer, module, loss, ctx, lr: float, name: str) -> None:
    """One update of ``module`` from ``loss`` at the micro-batch ``ctx`` (a ``StepContext``): the LR
    of the step, backward (scaled under fp16), clipping and the divergence stop, step, zero_grad.

    Under gradient accumulation the optimizer steps only on the last micro-batch (Accelerate's
    prepared optimizer skips the others), so the gradients of the others add up.
    """
    set_lr(optimizer, lr, ctx.step, ctx.train)
    ctx.accelerator.backward(loss)
    clip_and_check(module, optimizer, ctx, name)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
