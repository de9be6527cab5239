"""The frame both training loops share: start-up, resume, throughput and when to log, eval or save."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from accelerate.utils import set_seed

from training.checkpoint import CheckpointManager
from training.config import config_to_dict, save_config
from training.runtime import (
    JsonlLogger,
    TrainConfig,
    configure_threads,
    flat_hparams,
    make_accelerator,
)

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """What a started run holds before its model exists."""

    accelerator: object
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

    def items_per_s(self, step: int, train: TrainConfig) -> float:
        """Global items (images or code grids) per second since the loop (re)started."""
        steps = step - self.start_step
        items = steps * train.batch_size * train.grad_accum_steps * self.accelerator.num_processes
        return items / max(1e-9, time.time() - self.loop_started)


def start_run(config, train: TrainConfig, output_dir: Path, project: str, resume: str | None) -> Run:
    """Threads, Accelerator and logging; the resolved config and trackers; identical seeds everywhere.

    A resume target that is newer or unreadable is refused before anything is written.
    """
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
    return Run(accelerator, manager, metrics_log, resume_path, threads)


def due(step: int, every: int, max_steps: int) -> bool:
    """Whether a periodic action (log, eval, pictures, checkpoint) runs after ``step``: every
    ``every`` steps (0: never) and always after the last one."""
    return (every > 0 and step % every == 0) or step == max_steps
