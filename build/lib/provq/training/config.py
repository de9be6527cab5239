"""TrainConfig: the optimisation and bookkeeping fields both training stages share."""

from __future__ import annotations

from dataclasses import dataclass

from provq.common.typed_config import check_ranges


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping fields common to both stages."""

    max_steps: int = 1000
    batch_size: int = 32  # per process; the global batch is batch_size * processes * grad_accum_steps
    grad_accum_steps: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0
    optimizer: str = "adamw"  # adamw (decoupled decay) | adam (LlamaGen's tokenizer: Adam, no decay)
    weight_decay: float = 0.0
    weight_decay_1d: bool = True  # decay biases and norm scales too (False: LlamaGen's GPT groups)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    mixed_precision: str = "no"  # no | bf16 | fp16 (fp16 on GPUs only) | auto (bf16 where it is faster)
    compile: bool = False  # compile the model's hot blocks in place (inductor): faster steps, a slow first one
    ema_decay: float = 0.0  # 0 = no EMA
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2
    image_every: int = 500  # picture grids (reconstructions or samples)
    eval_every: int = 0  # 0 = only at the end

    def __post_init__(self):
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be adam or adamw, not {self.optimizer!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16", "auto"):
            raise ValueError(f"mixed_precision must be no, bf16, fp16 or auto, not {self.mixed_precision!r}")
        check_ranges(self, at_least_one=("max_steps", "batch_size", "grad_accum_steps", "log_every", "save_every"),
                     positive=("lr",), fraction=("min_lr_ratio", "beta1", "beta2", "ema_decay"),
                     non_negative=("warmup_steps", "weight_decay", "grad_clip", "keep_checkpoints",
                                   "image_every", "eval_every"))
