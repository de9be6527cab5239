"""What every training script shares: threads, Accelerator, checkpoints, logs, LR, batches."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CHECKPOINT_MARKER = "checkpoint.json"
CHECKPOINT_FORMAT = 1


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
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    log_with = None
    try:
        import tensorboard  # noqa: F401

        log_with = "tensorboard"
    except ImportError:
        pass
    return Accelerator(
        mixed_precision=train.mixed_precision,
        gradient_accumulation_steps=train.grad_accum_steps,
        # The sampler's order is a function of (seed, epoch): every process agrees,
        # and a resumed run replays the same order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train.seed),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(Path(output_dir) / "logs")),
        log_with=log_with,
    )


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


def grad_norm_is_finite(step: int, norm) -> None:
    if norm is not None and not math.isfinite(float(norm)):
        raise DivergenceError(f"step {step}: the gradient norm is {float(norm)}; stopping.")


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


def step_generator(seed: int, step: int, rank: int, device="cpu") -> torch.Generator:
    """Training randomness as a pure function of (seed, step, rank): resume replays it."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1))
    return gen


class CheckpointManager:
    """Atomic ``save_state`` folders under ``<output_dir>/checkpoints``, pruned to ``keep``."""

    def __init__(self, output_dir: str | Path, keep: int = 2):
        self.root = Path(output_dir) / "checkpoints"
        self.keep = keep

    def save(self, accelerator, step: int) -> Path:
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp_step_{step:08d}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            marker = {"step": step, "format": CHECKPOINT_FORMAT, "time": time.time()}
            _write_json_synced(tmp / CHECKPOINT_MARKER, marker)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # the checkpoint appears whole or not at all
            self._prune()
        accelerator.wait_for_everyone()
        return final

    def _prune(self) -> None:
        for old in self.complete()[: -self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in sorted(self.root.glob("step_*")):
            if (path / CHECKPOINT_MARKER).is_file():
                found.append(path)
            else:
                logger.warning("skipping incomplete checkpoint %s (no %s)", path, CHECKPOINT_MARKER)
        return found

    def resolve(self, resume: str | None) -> Path | None:
        """The folder ``--resume`` names: ``latest``, a path, or None for a fresh run."""
        if not resume:
            return None
        if resume == "latest":
            found = self.complete()
            if not found:
                logger.warning("--resume latest: no complete checkpoint in %s; starting fresh", self.root)
                return None
            return found[-1]
        path = Path(resume)
        if not (path / CHECKPOINT_MARKER).is_file():
            raise FileNotFoundError(
                f"--resume {resume}: not a complete checkpoint (no {CHECKPOINT_MARKER}); "
                "use --resume latest or a folder under checkpoints/"
            )
        return path

    @staticmethod
    def load(accelerator, path: Path) -> int:
        marker = json.loads((path / CHECKPOINT_MARKER).read_text())
        if marker.get("format", 0) > CHECKPOINT_FORMAT:
            raise ValueError(f"{path} was written by a newer version (format {marker['format']})")
        accelerator.load_state(str(path))
        return int(marker["step"])


def _write_json_synced(path: Path, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f)
        f.flush()
        os.fsync(f.fileno())


class JsonlLogger:
    """Metrics as one JSON line per log step (main process), mirrored to the trackers."""

    def __init__(self, path: str | Path, accelerator):
        self.path = Path(path)
        self.accelerator = accelerator
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so no step appears twice."""
        if not self.accelerator.is_main_process or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict) -> None:
        clean = {k: (v.item() if torch.is_tensor(v) else v) for k, v in metrics.items()}
        self.accelerator.log(clean, step=step)
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **clean}) + "\n")


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
