"""The weights a run hands to users: an optional EMA of them, exported with ``save_pretrained``."""

from __future__ import annotations

import logging
from pathlib import Path

from provq.training.checkpoint import together

logger = logging.getLogger(__name__)


def build_ema(model, decay: float, accelerator):
    """diffusers' EMAModel of the weights, saved with the checkpoints; None when decay is 0."""
    if decay <= 0:
        return None
    from diffusers.training_utils import EMAModel

    ema = EMAModel(accelerator.unwrap_model(model).parameters(), decay=decay)
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)
    return ema


def export_pretrained(model, ema, accelerator, path: Path, metrics=None, datasets=None) -> Path:
    """``save_pretrained`` of the unwrapped model on the main process, with the EMA weights when on,
    and its card listing ``metrics`` (common.cards.CardMetric) of ``datasets``. A full disk or an
    unwritable folder is a ``StorageError`` on every process; the checkpoints are untouched."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if ema is not None:
        ema.store(unwrapped.parameters())
        ema.copy_to(unwrapped.parameters())
    try:
        together(accelerator, Path(path), f"the {unwrapped.kind} export",
                 lambda: unwrapped.save_pretrained(path, metrics or [], datasets or []))
    finally:
        if ema is not None:
            ema.restore(unwrapped.parameters())
    logger.info("written %s", path)
    return Path(path)
