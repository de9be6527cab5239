"""The run infrastructure both training scripts share; scripts import it from here.

    config.py           TrainConfig (the presets and the command line: provq.common.presets, provq.common.cli)
    accelerator.py      threads per core, the Accelerator, process state of the other commands
    reproducibility.py  randomness and data order as functions of (seed, step, rank)
    optimization.py     LR schedule, clipping, divergence stops
    metrics_log.py      metrics.jsonl and the trackers
    checkpoint.py       atomic checkpoints, resume
    export.py           EMA and the exported weights
    loop.py             the loop's mechanics: TrainingRun.steps, OptimizerStep.micro_batches
"""

from provq.common.errors import ConfigError
from provq.training.accelerator import (
    configure_threads,
    launched_processes,
    make_accelerator,
    process_state,
)
from provq.training.checkpoint import CheckpointManager, NonPersistentBuffers
from provq.training.config import TrainConfig
from provq.training.export import build_ema
from provq.training.loop import (
    OptimizerStep,
    StepContext,
    TrainingRun,
    TrainParts,
    finish_run,
    start_run,
)
from provq.training.metrics_log import StepTerms
from provq.training.optimization import (
    DivergenceError,
    check_finite,
    make_optimizer,
    optimizer_step,
)

__all__ = [
    "CheckpointManager",
    "ConfigError",
    "DivergenceError",
    "NonPersistentBuffers",
    "OptimizerStep",
    "StepContext",
    "StepTerms",
    "TrainConfig",
    "TrainParts",
    "TrainingRun",
    "build_ema",
    "check_finite",
    "configure_threads",
    "finish_run",
    "launched_processes",
    "make_accelerator",
    "make_optimizer",
    "process_state",
    "optimizer_step",
    "start_run",
]
