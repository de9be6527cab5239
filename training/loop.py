"""The one training loop both stages run: start-up, resume, micro-batches, the stage's own step,
and the periodic work when it is due (log, the stage's evaluations and pictures, checkpoint)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from accelerate.utils import set_seed
from tqdm.auto import tqdm

from common.typed_config import config_to_dict
from training.accelerator import configure_threads, make_accelerator
from training.checkpoint import CheckpointManager
from training.config import TrainConfig, save_config
from training.export import export_pretrained
from training.metrics_log import JsonlLogger, StepTerms, flat_hparams, global_terms
from training.reproducibility import batches, seed_step, step_generator

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """A started run: its Accelerator, checkpoints and log, before its model exists."""

    accelerator: object
    train: TrainConfig
    output_dir: Path
    manager: CheckpointManager
    metrics_log: JsonlLogger
    resume_path: Path | None
    threads: int  # torch threads of this process
    start_step: int = 0
    loop_started: float = field(default_factory=time.time)

    def resume(self) -> int:
        """Load the checkpoint asked for (after ``prepare`` and ``register_for_checkpointing``).

        Returns the step to continue from: 0 for a fresh run.
        """
        step = 0
        if self.resume_path is not None:
            step = self.manager.load(self.accelerator, self.resume_path)
            self.metrics_log.truncate_after(step)
            logger.info("resumed from %s at step %d", self.resume_path, step)
        self.start_step, self.loop_started = step, time.time()
        return step

    def items_per_s(self, step: int) -> float:
        """Global items (images or code grids) per second since the loop (re)started."""
        train = self.train
        items = (step - self.start_step) * train.batch_size * train.grad_accum_steps * self.accelerator.num_processes
        return items / max(1e-9, time.time() - self.loop_started)


def start_run(config, train: TrainConfig, output_dir: str | Path, project: str, resume: str | None) -> Run:
    """Threads, Accelerator and logging; the resolved config and trackers; identical seeds everywhere.

    A resume target that is newer or unreadable is refused before anything is written.
    """
    output_dir = Path(output_dir)
    threads = configure_threads()
    accelerator = make_accelerator(train, output_dir)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file is noise
    manager = CheckpointManager(output_dir, keep=train.keep_checkpoints)
    resume_path = manager.resolve(resume)
    if accelerator.is_main_process:
        save_config(config, output_dir / "config.yaml")
        accelerator.init_trackers(project, config=flat_hparams(config_to_dict(config)))
    # Identical initial weights on every process; python/numpy RNGs seeded too, so every RNG
    # state a checkpoint holds is a function of the seed and the step.
    set_seed(train.seed)
    metrics_log = JsonlLogger(output_dir / "metrics.jsonl", accelerator)
    return Run(accelerator, train, output_dir, manager, metrics_log, resume_path, threads)


def due(step: int, every: int, max_steps: int) -> bool:
    """Whether a periodic action (log, eval, pictures, checkpoint) runs after ``step``: every
    ``every`` steps (0: never) and always after the last one."""
    return (every > 0 and step % every == 0) or step == max_steps


@dataclass
class TrainParts:
    """What the loop drives: the prepared model, its optimizer, the training batches, the EMA.

    Each stage extends it with what its step and periodic work need."""

    model: object
    optimizer: object
    train_loader: object
    ema: object | None

    def accumulated(self) -> list:
        """The prepared modules a step updates: under gradient accumulation, none of them
        synchronises gradients across processes before the last micro-batch."""
        return [self.model]


@dataclass
class StepContext:
    """Where a micro-batch sits in the run; its randomness is a function of ``micro_step``."""

    step: int  # the optimizer step this micro-batch belongs to (0-based)
    micro_step: int  # micro-batches since the run began: distinct within an accumulated step
    accelerator: object
    train: TrainConfig

    def generator(self, device="cpu"):
        """The micro-batch's own RNG (label dropout, the stochastic mask): resume replays it."""
        return step_generator(self.train.seed, self.micro_step, self.accelerator.process_index, device)


@dataclass
class Periodic:
    """Work after an optimizer step, every ``every`` steps (0: only after the last)."""

    every: int
    run: Callable[[int], None]  # called with the step just finished


@dataclass
class Stage:
    """What a training script gives the loop."""

    name: str  # the progress bar's label
    step: Callable[[TrainParts, dict, StepContext], StepTerms]  # one micro-batch, with its update
    periodic: list[Periodic] = field(default_factory=list)  # in order, after the log line
    items: str = "items"  # what one batch row is, for the throughput column: images, codes
    postfix: dict[str, str] = field(default_factory=dict)  # progress-bar label -> logged key


def train_loop(run: Run, parts: TrainParts, stage: Stage) -> None:
    """Micro-batches from ``run.start_step`` to ``max_steps``; after each optimizer step: EMA,
    the log line, ``stage.periodic`` and the checkpoint, each when due (in that order, so a run
    resumed from any checkpoint never logs a step twice)."""
    accelerator, train = run.accelerator, run.train
    step = run.start_step
    progress = tqdm(total=train.max_steps, initial=step, desc=stage.name, dynamic_ncols=True,
                    disable=not accelerator.is_main_process)
    micro_batches = batches(parts.train_loader, accelerator, step, train.grad_accum_steps)
    micro_step = step * train.grad_accum_steps
    while step < train.max_steps:
        batch = next(micro_batches)
        seed_step(train.seed, micro_step, accelerator.process_index)
        with accelerator.accumulate(*parts.accumulated()):
            terms = stage.step(parts, batch, StepContext(step, micro_step, accelerator, train))
        micro_step += 1
        if not accelerator.sync_gradients:
            continue
        step += 1
        if parts.ema is not None:
            parts.ema.step(accelerator.unwrap_model(parts.model).parameters())
        progress.update(1)
        if due(step, train.log_every, train.max_steps):
            log_step(run, parts, stage, step, terms, progress)
        for work in stage.periodic:
            if due(step, work.every, train.max_steps):
                work.run(step)
        if due(step, train.save_every, train.max_steps):
            run.manager.save(accelerator, step)
    progress.close()


def log_step(run: Run, parts: TrainParts, stage: Stage, step: int, terms: StepTerms, progress) -> None:
    logs = global_terms(terms, run.accelerator)
    logs.update({"lr": parts.optimizer.param_groups[0]["lr"], f"{stage.items}_per_s": run.items_per_s(step)})
    run.metrics_log.log(step, logs)
    progress.set_postfix({label: f"{logs[key]:.4g}" for label, key in stage.postfix.items() if key in logs})


def finish_run(run: Run, parts: TrainParts, export_dir: Path) -> Path:
    """Export the weights (the EMA's when on) and close the trackers."""
    path = export_pretrained(parts.model, parts.ema, run.accelerator, export_dir)
    run.accelerator.end_training()
    return path
