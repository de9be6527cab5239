"""Stage 2: a class-conditional autoregressive prior over tokenizer codes (after LlamaGen)."""

from .codes import (
    CodeDataset,
    CodeShardWriter,
    CodesManifest,
    check_fingerprint,
    load_manifest,
)
from .errors import CodeRangeError, FingerprintMismatchError, PriorFormatError
from .model import ARPrior, PriorConfig, PriorOutput, preset
from .sampling import sample

__all__ = [
    "ARPrior",
    "CodeDataset",
    "CodeRangeError",
    "CodeShardWriter",
    "CodesManifest",
    "FingerprintMismatchError",
    "PriorConfig",
    "PriorFormatError",
    "PriorOutput",
    "check_fingerprint",
    "load_manifest",
    "preset",
    "sample",
]
