"""Stage 2: a class-conditional autoregressive prior over tokenizer codes (after LlamaGen)."""

from provq.common.folders import TOKENIZER_RECORD

from .code_shards import (
    CodeDataset,
    CodeShardWriter,
    CodesManifest,
    load_manifest,
)
from .errors import CodeRangeError, FingerprintMismatchError
from .model import ARPrior, PriorConfig, PriorOutput
from .sampling import sample

__all__ = [
    "ARPrior",
    "CodeDataset",
    "CodeRangeError",
    "CodeShardWriter",
    "CodesManifest",
    "FingerprintMismatchError",
    "PriorConfig",
    "PriorOutput",
    "TOKENIZER_RECORD",
    "load_manifest",
    "sample",
]
