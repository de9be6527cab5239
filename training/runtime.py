"""What every training script shares: threads, Accelerator, seeds, LR, logs, batches, EMA, export."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)



@dataclass
class TrainConfig:
    """Optimisation and bookkeeping fields common to both stages."""

    max_steps: int = 1000
    batch_size: int = 32  # per process; the global batch is batch_size * processes * grad_accum_steps
    grad_accum_steps: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    mixed_precision: str = "no"  # no | bf16 | fp16 (fp16 on GPUs only)
    ema_decay: float = 0.0  # 0 = no EMA
    seed: int = 0
    num_workers: int = 0
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2
    image_every: int = 500  # picture grids (reconstructions or samples)
    eval_every: int = 0  # 0 = only at the end

    def __post_init__(self):
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be no, bf16 or fp16, not {self.mixed_precision!r}")
        for name in ("max_steps", "batch_size", "grad_accum_steps", "log_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


class DivergenceError(RuntimeError):
    """A loss or gradient became NaN or inf."""


def configure_threads() -> int:
    """One torch thread per core this process really has.

    Oversubscribed OpenMP threads spin and make a CPU step ~10x slower, so the
    cores are shared out between the processes of this machine unless the user
    set OMP_NUM_THREADS.
    """
    if "OMP_NUM_THREADS" in os.environ:
        threads = int(os.environ["OMP_NUM_THREADS"])
    else:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = max(1, (cores or 1) // max(1, local))
    torch.set_num_threads(threads)
    return threads


def make_accelerator(train: TrainConfig, output_dir: str | Path):
    from accelerate import Accelerator
    from accelerate.utils import (
        DataLoaderConfiguration,
        GradientAccumulationPlugin,
        ProjectConfiguration,
    )

    log_with = None
    try:
        import tensorboard  # noqa: F401

        log_with = "tensorboard"
    except ImportError:
        pass
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        # Without cpu=True, Accelerate on a machine with no accelerator ignores the
        # torchrun / `accelerate launch --multi_gpu` environment and makes every process
        # a separate one-process run; with it, the processes form one gloo group.
        cpu=launched > 1 and not _has_accelerator(),
        mixed_precision=train.mixed_precision,
        # A step is always grad_accum_steps micro-batches, also across an epoch's end
        # (Accelerate would otherwise force a short step there): `batches` can then
        # find a resumed step's place in the data from the step number alone.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=train.grad_accum_steps, sync_with_dataloader=False
        ),
        # The sampler's order is a function of (seed, epoch): every process agrees,
        # and a resumed run replays the same order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train.seed),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(Path(output_dir) / "logs")),
        log_with=log_with,
    )
    if launched > 1 and accelerator.num_processes == 1:
        # Every process would train alone and overwrite the others' files.
        raise RuntimeError(
            f"launched as {launched} processes, but Accelerate set up a single-process run; "
            "on CPUs start them with `torchrun --nproc_per_node N script.py ...`"
        )
    return accelerator


def _has_accelerator() -> bool:
    if hasattr(torch, "accelerator"):  # torch >= 2.6: CUDA, XPU, MPS, ...
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR factor: linear warmup, then cosine decay to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def check_finite(step: int, **terms) -> None:
    """Stop on the first NaN/inf term, naming it; the last good checkpoint stays."""
    for name, value in terms.items():
        if value is None:
            continue
        tensor = value if torch.is_tensor(value) else torch.tensor(float(value))
        if not torch.isfinite(tensor).all():
            raise DivergenceError(
                f"step {step}: '{name}' is {tensor.detach().float().flatten()[0].item()}; "
                "stopping. The last good checkpoint is untouched: lower the LR or use fp32, "
                "then --resume latest."
            )


def grad_norm_is_finite(step: int, norm, name: str = "model") -> None:
    if norm is not None and not math.isfinite(float(norm)):
        raise DivergenceError(
            f"step {step}: the {name}'s gradient norm is {float(norm)}; stopping before the update. "
            "The last good checkpoint is untouched: lower the LR or use fp32, then --resume latest."
        )


class NonPersistentBuffers:
    """A module's non-persistent buffers (statistics kept out of its weights) as a checkpointable
    object: ``accelerator.register_for_checkpointing(NonPersistentBuffers(module))``."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.names = [f"{prefix}.{name}" if prefix else name
                      for prefix, sub in module.named_modules()
                      for name in sorted(sub._non_persistent_buffers_set)]

    def _buffer(self, dotted: str) -> torch.Tensor:
        return self.module.get_buffer(dotted)  # looked up each time: .to() replaces buffers

    def state_dict(self) -> dict:
        return {name: self._buffer(name).detach().cpu().clone() for name in self.names}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name in self.names:
                self._buffer(name).copy_(state[name])


def batches(dataloader, accelerator, start_step: int, grad_accum_steps: int = 1):
    """Endless micro-batches, starting exactly where step ``start_step`` left off."""
    per_epoch = len(dataloader)
    if per_epoch == 0:
        raise ValueError("the dataloader is empty: fewer images than one batch?")
    epoch, skip = divmod(start_step * grad_accum_steps, per_epoch)
    while True:
        dataloader.set_epoch(epoch)
        if hasattr(dataloader.dataset, "set_epoch"):
            dataloader.dataset.set_epoch(epoch)
        loader = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        yield from loader
        epoch, skip = epoch + 1, 0


def _step_seed(seed: int, step: int, rank: int, stream: int = 0) -> int:
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729 + stream * 15_485_863) % (2**63 - 1)


def step_generator(seed: int, step: int, rank: int, device="cpu") -> torch.Generator:
    """Training randomness as a pure function of (seed, step, rank): resume replays it."""
    gen = torch.Generator(device=device)
    gen.manual_seed(_step_seed(seed, step, rank))
    return gen


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed the global RNGs (torch, numpy, python) from (seed, step, rank) before a step.

    Anything that draws from them (dropout, a library's augmentation) is then replayed
    exactly by a resumed run, although the data loader draws from the global torch RNG
    each time it starts an epoch and a resumed run starts one more.
    """
    from accelerate.utils import set_seed

    set_seed(_step_seed(seed, step, rank, stream=1) % 2**32)


class JsonlLogger:
    """Metrics as one JSON line per log step (main process), mirrored to the trackers."""

    def __init__(self, path: str | Path, accelerator):
        self.path = Path(path)
        self.accelerator = accelerator
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so no step appears twice
        (and a line cut short by the kill)."""
        if not self.accelerator.is_main_process or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if _logged_step(line) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)  # a kill during the rewrite keeps the old log

    def log(self, step: int, metrics: dict) -> None:
        clean = {k: (v.item() if torch.is_tensor(v) else v) for k, v in metrics.items()}
        self.accelerator.log(clean, step=step)
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **clean}) + "\n")


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a partial or foreign line: dropped


def flat_hparams(mapping: dict, prefix: str = "") -> dict:
    """Tracker-friendly flat hyper-parameters (TensorBoard takes scalars and strings only)."""
    flat = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def set_lr(optimizer, base_lr: float, step: int, train: TrainConfig) -> None:
    """Warmup + cosine LR as a pure function of the step.

    No scheduler state: resuming and the number of processes cannot change it
    (Accelerate's prepared schedulers step once per process).
    """
    factor = warmup_cosine(step, train.warmup_steps, train.max_steps, train.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = base_lr * factor


def build_ema(model, decay: float, accelerator):
    """diffusers' EMAModel of the weights, saved with the checkpoints; None when decay is 0."""
    if decay <= 0:
        return None
    from diffusers.training_utils import EMAModel

    ema = EMAModel(accelerator.unwrap_model(model).parameters(), decay=decay)
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)
    return ema


def export_pretrained(model, ema, accelerator, path: Path) -> Path:
    """``save_pretrained`` of the unwrapped model on the main process, with the EMA weights when on."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if ema is not None:
        ema.store(unwrapped.parameters())
        ema.copy_to(unwrapped.parameters())
    if accelerator.is_main_process:
        unwrapped.save_pretrained(path)
        logger.info("written %s", path)
    if ema is not None:
        ema.restore(unwrapped.parameters())
    accelerator.wait_for_everyone()
    return Path(path)


def global_terms(terms: dict, accelerator) -> dict:
    """Logged numbers for the global batch: the losses averaged over processes (one collective);
    the quantizer statistics are global already."""
    names = [k for k, v in terms.items() if k.startswith("loss/") and torch.is_tensor(v)]
    logs = {k: v.item() if torch.is_tensor(v) else v for k, v in terms.items()}
    if names and accelerator.num_processes > 1:
        losses = accelerator.reduce(torch.stack([terms[k].float() for k in names]), "mean")
        logs.update(zip(names, losses.tolist(), strict=True))
    return logs


def clip_and_check(module, train: TrainConfig, step: int, accelerator, name: str) -> None:
    """Clip the gradients (grad_clip 0: measure only) and stop on a NaN/inf norm before the update.

    Under fp16 the loss scaler owns non-finite gradients (it skips that step), so no check there.
    """
    if not accelerator.sync_gradients:
        return
    max_norm = train.grad_clip if train.grad_clip > 0 else float("inf")
    norm = accelerator.clip_grad_norm_(module.parameters(), max_norm)
    if accelerator.scaler is None:
        grad_norm_is_finite(step, norm, name)
