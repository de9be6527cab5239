"""Run infrastructure shared by the training scripts: configs, Accelerate, checkpoints, logs."""

from training.checkpoint import CheckpointManager
from training.config import (
    ConfigError,
    build_config,
    config_to_dict,
    make_parser,
    parse_config,
    save_config,
)
from training.runtime import (
    DivergenceError,
    JsonlLogger,
    TrainConfig,
    batches,
    check_finite,
    configure_threads,
    make_accelerator,
    seed_step,
    step_generator,
    warmup_cosine,
)

__all__ = [
    "CheckpointManager",
    "ConfigError",
    "DivergenceError",
    "JsonlLogger",
    "TrainConfig",
    "batches",
    "build_config",
    "check_finite",
    "config_to_dict",
    "configure_threads",
    "make_accelerator",
    "make_parser",
    "parse_config",
    "save_config",
    "seed_step",
    "step_generator",
    "warmup_cosine",
]
