"""The mechanics of the one training loop both scripts drive: start-up, resume, optimizer steps made of
micro-batches, per-micro-batch seeds, the progress bar, the log line, checkpoints, export.

A script reads like the Accelerate examples::

    with training.start_run(config, train_config, output_dir, "tokenizer", resume) as run:
        ...                                    # data, models, optimizers (prepared), then:
        run.resume()
        for step in run.steps(parts, "tokenizer", items="images"):
            for batch, ctx in step.micro_batches():
                terms = train_step(parts, batch, ctx)       # forward, loss, backward, update
            step.log(terms)
            if step.due(train_config.eval_every):
                run.metrics_log.log(step.number, evaluate(...))
        return training.finish_run(run, parts, output_dir / "tokenizer")

After each optimizer step the EMA is updated; the checkpoint is written when the script's loop body
(its log line and periodic work) is done, so a run resumed from any checkpoint logs no step twice.
That is also where a SIGINT or SIGTERM stops the run (agreed over the processes): a checkpoint of
the step, then ``common.signals.Interrupted``. The run holds its output folder's lock while inside
the ``with``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from accelerate.utils import set_seed
from tqdm.auto import tqdm

from provq.common import signals
from provq.common.errors import StorageError
from provq.common.folders import expect_output
from provq.common.locks import output_lock
from provq.common.presets import save_config
from provq.common.typed_config import config_to_dict
from provq.training.accelerator import configure_threads, make_accelerator
from provq.training.checkpoint import CheckpointManager, together
from provq.training.config import TrainConfig
from provq.training.export import export_pretrained
from provq.training.metrics_log import JsonlLogger, StepTerms, flat_hparams, global_terms
from provq.training.reproducibility import batches, seed_step, step_generator

logger = logging.getLogger(__name__)


@dataclass
class TrainParts:
    """What the loop drives: the prepared model, its optimizer, the training batches, the EMA.

    Each script extends it with what its step and periodic work need."""

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
class TrainingRun:
    """A started run: its Accelerator, checkpoints and log, before its model exists."""

    accelerator: object
    train: TrainConfig
    output_dir: Path
    checkpoints: CheckpointManager
    metrics_log: JsonlLogger
    resume_path: Path | None
    threads: int  # torch threads of this process
    start_step: int = 0
    loop_started: float = field(default_factory=time.time)
    held: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # the output folder's lock

    def __enter__(self) -> TrainingRun:
        return self

    def __exit__(self, *exc) -> None:
        self.held.close()

    def resume(self) -> int:
        """Load the checkpoint asked for (after ``prepare`` and ``register_for_checkpointing``).

        Returns the step to continue from: 0 for a fresh run.
        """
        step = 0
        if self.resume_path is not None:
            step = self.checkpoints.load(self.accelerator, self.resume_path)
            self.metrics_log.truncate_after(step)
            logger.info("resumed from %s at step %d", self.resume_path, step)
        self.start_step, self.loop_started = step, time.time()
        return step

    def items_per_s(self, step: int) -> float:
        """Global items (images or code grids) per second since the loop (re)started."""
        train = self.train
        items = (step - self.start_step) * train.batch_size * train.grad_accum_steps * self.accelerator.num_processes
        return items / max(1e-9, time.time() - self.loop_started)

    def steps(self, parts: TrainParts, name: str, items: str = "items",
              postfix: dict[str, str] | None = None) -> Iterator[OptimizerStep]:
        """The optimizer steps from ``start_step`` to ``max_steps``; after the loop body of each, the
        checkpoint when due. ``name`` labels the progress bar, ``items`` what a batch row is (the
        throughput column), ``postfix`` maps progress-bar labels to logged keys."""
        train = self.train
        progress = tqdm(total=train.max_steps, initial=self.start_step, desc=name, dynamic_ncols=True,
                        disable=not self.accelerator.is_main_process)
        source = batches(parts.train_loader, self.accelerator, self.start_step, train.grad_accum_steps)
        micro_step = self.start_step * train.grad_accum_steps
        with progress:  # closed before a stop's message is printed
            for index in range(self.start_step, train.max_steps):
                step = OptimizerStep(self, parts, index, micro_step, source, progress, items, postfix or {})
                yield step
                micro_step = step.micro_step
                self.after_step(step.number)

    def after_step(self, number: int) -> None:
        """The checkpoint when due, or when a process got SIGINT or SIGTERM: then the stop."""
        signum = signals.agreed(self.accelerator.num_processes, self.accelerator.device)
        if not (signum or due(number, self.train.save_every, self.train.max_steps)):
            return
        saved = self.checkpoints.save(self.accelerator, number)
        if signum:
            self.accelerator.end_training()  # the trackers' files flushed
            raise signals.interrupted(signum, f"at step {number}", f"checkpoint {saved}")


@dataclass
class OptimizerStep:
    """One optimizer step: ``micro_batches()`` (each under ``accelerator.accumulate``), then the
    periodic work of the script's loop body; ``number`` is the count of steps done after it."""

    run: TrainingRun
    parts: TrainParts
    index: int  # 0-based: the step being taken
    micro_step: int
    source: Iterator
    progress: object
    items: str
    postfix: dict

    @property
    def number(self) -> int:
        return self.index + 1

    def micro_batches(self) -> Iterator[tuple[dict, StepContext]]:
        """This step's micro-batches with their contexts, the global RNGs seeded per micro-batch;
        after the last one (the update), the EMA follows the weights."""
        accelerator, train = self.run.accelerator, self.run.train
        while True:
            batch = next(self.source)
            seed_step(train.seed, self.micro_step, accelerator.process_index)
            with accelerator.accumulate(*self.parts.accumulated()):
                yield batch, StepContext(self.index, self.micro_step, accelerator, train)
            self.micro_step += 1
            if accelerator.sync_gradients:
                break
        if self.parts.ema is not None:
            self.parts.ema.step(accelerator.unwrap_model(self.parts.model).parameters())
        self.progress.update(1)

    def due(self, every: int) -> bool:
        """Whether periodic work runs after this step (every ``every`` steps, 0: only after the last)."""
        return due(self.number, every, self.run.train.max_steps)

    def log(self, terms: StepTerms) -> None:
        """The log line of the step (the last micro-batch's terms, over all processes), when due."""
        if not self.due(self.run.train.log_every):
            return
        logs = global_terms(terms, self.run.accelerator)
        logs.update({"lr": self.parts.optimizer.param_groups[0]["lr"],
                     f"{self.items}_per_s": self.run.items_per_s(self.number)})
        self.run.metrics_log.log(self.number, logs)
        self.progress.set_postfix({label: f"{logs[key]:.4g}" for label, key in self.postfix.items() if key in logs})


def start_run(config, train: TrainConfig, output_dir: str | Path, project: str, resume: str | None) -> TrainingRun:
    """Threads, Accelerator and logging; the resolved config and trackers; identical seeds everywhere.

    A resume target that is newer or unreadable is refused before anything is written.
    """
    output_dir = Path(output_dir)
    expect_output(output_dir, f"{project} run")
    threads = configure_threads()
    accelerator = make_accelerator(train, output_dir)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file is noise
    checkpoints = CheckpointManager(output_dir, keep=train.keep_checkpoints)
    resume_path = checkpoints.resolve(resume)
    held = contextlib.ExitStack()
    held.enter_context(output_lock(output_dir, accelerator))
    try:
        together(accelerator, output_dir, "the run's config and trackers", lambda: (
            save_config(config, output_dir / "config.yaml"),
            accelerator.init_trackers(project, config=flat_hparams(config_to_dict(config)))))
    except BaseException:
        held.close()
        raise
    # Identical initial weights on every process; python/numpy RNGs seeded too, so every RNG
    # state a checkpoint holds is a function of the seed and the step.
    set_seed(train.seed)
    metrics_log = JsonlLogger(output_dir / "metrics.jsonl", accelerator)
    return TrainingRun(accelerator, train, output_dir, checkpoints, metrics_log, resume_path, threads, held=held)


def due(step: int, every: int, max_steps: int) -> bool:
    """Whether a periodic action (log, eval, pictures, checkpoint) runs after ``step``: every
    ``every`` steps (0: never) and always after the last one."""
    return (every > 0 and step % every == 0) or step == max_steps


def finish_run(run: TrainingRun, parts: TrainParts, export_dir: Path, metrics=None, datasets=None) -> Path:
    """Export the weights (the EMA's when on) with a model card of ``metrics``, and close the trackers."""
    try:
        path = export_pretrained(parts.model, parts.ema, run.accelerator, export_dir, metrics, datasets)
    except StorageError as error:
        raise StorageError(f"{error}; the checkpoints are untouched: {run.checkpoints.latest_hint()}") from error
    run.accelerator.end_training()
    return path
