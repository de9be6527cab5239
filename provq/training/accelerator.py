"""Process set-up: torch threads per core, the Accelerator of a training run, and the process
state of the commands that do not train (extraction, sampling, evaluation)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from provq.common.errors import UserError
from provq.training.config import TrainConfig


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


def has_accelerator() -> bool:
    if hasattr(torch, "accelerator"):  # torch >= 2.6: CUDA, XPU, MPS, ...
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def launched_processes() -> int:
    """How many processes the launcher (torchrun, accelerate launch) started."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def needs_cpu_group(device: str | None = None) -> bool:
    """Accelerate forms a gloo group of CPU processes only when told ``cpu=True``; without it, on a
    machine with no accelerator, a torchrun launch becomes N lone processes."""
    if device is not None:
        return device == "cpu"
    return launched_processes() > 1 and not has_accelerator()


def check_world(num_processes: int) -> None:
    """Refuse a launch that Accelerate turned into lone processes: each would write every file."""
    launched = launched_processes()
    if launched > 1 and num_processes == 1:
        raise UserError(f"launched as {launched} processes, but Accelerate set up a single-process run; "
                        "on CPUs start them with `torchrun --nproc_per_node N script.py ...`")


def probe_precision(seconds: float = 0.5, size: int = 512) -> tuple[str, str]:
    """``mixed_precision: auto`` on a CPU: (bf16 or no, why) from timing the same matmul in both for
    about ``seconds`` each. bf16 wins on CPUs with bf16 units (AMX, AVX-512 BF16: about 4x here);
    without them it is emulated and fp32 wins."""
    import time

    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(size, size).to(dtype)
        a @ a  # the first call pays for any one-time set-up
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 2:
            a @ a
            count += 1
        rates[dtype] = count / (time.perf_counter() - started)
    ratio = rates[torch.bfloat16] / rates[torch.float32]
    choice = "bf16" if ratio > 1.2 else "no"
    return choice, f"a {size}x{size} bf16 matmul ran at {ratio:.2f}x the fp32 rate on this CPU"


def emulated_bf16() -> str | None:
    """Why bf16 would be emulated here, many times slower than fp32 (0.02x on an AVX2-only AMD EPYC): a
    CPU whose flags show no bf16 units. None on a GPU, on a CPU with bf16 units, or where flags are unread."""
    if torch.cuda.is_available():
        return None
    from provq.common.machine import cpu_description

    cpu = cpu_description()
    if cpu["bf16_units"] is not False:
        return None
    return (f"mixed_precision bf16 on a CPU without bf16 units ({cpu['model']}: no AMX, no AVX-512 BF16): "
            f"{probe_precision(0.2)[1]}")


def resolve_precision(requested: str) -> tuple[str, str | None]:
    """The precision Accelerate gets, and why when ``auto`` chose it (GPUs: bf16 where supported).
    An explicit bf16 that this CPU would emulate is refused (``emulated_bf16``): the user expects it faster."""
    if requested != "auto":
        if requested == "bf16" and (why := emulated_bf16()):
            raise UserError(f"{why}; set it to no (fp32) or auto, e.g. --tokenizer.train.mixed_precision auto or "
                            "--prior.train.mixed_precision auto")
        return requested, None
    if torch.cuda.is_available():
        choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return choice, f"the GPU {'supports' if choice == 'bf16' else 'lacks'} bf16"
    return probe_precision()


def make_accelerator(train: TrainConfig, output_dir: str | Path):
    """The Accelerator of a training run: precision, accumulation, seedable sampler, trackers."""
    from accelerate import Accelerator
    from accelerate.utils import (
        DataLoaderConfiguration,
        GradientAccumulationPlugin,
        ProjectConfiguration,
    )

    try:
        import tensorboard  # noqa: F401

        log_with = "tensorboard"
    except ImportError:
        log_with = None
    precision, why = resolve_precision(train.mixed_precision)
    if why:  # each process probes: on one machine the ratio (~4x, or below 1) is far from the threshold
        logging.getLogger(__name__).warning("mixed_precision auto: %s (%s)", precision, why)
    accelerator = Accelerator(
        cpu=needs_cpu_group(),
        mixed_precision=precision,
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
    check_world(accelerator.num_processes)
    return accelerator


def process_state(device: str | None = None):
    """Accelerate's PartialState (rank, world size, device) for a command that does not train.

    ``device`` forces one ("cpu", "cuda:1"); by default the GPU when there is one.
    """
    from accelerate import PartialState

    state = PartialState(cpu=needs_cpu_group(device))
    check_world(state.num_processes)
    return state
