"""ProVQ: progressive-quantization image tokenizers and autoregressive priors (arXiv 2603.22304).

The library is ``provq.api`` (``load_tokenizer``, ``load_prior``, ``generate``, ``rfid``, ``gfid``,
``SamplingConfig``), exported here and imported on first use, so ``import provq`` stays light.
"""

from __future__ import annotations

import importlib

__all__ = ["DEFAULT_CFG_SCALE", "SamplingConfig", "load_tokenizer", "load_prior", "generate", "rfid", "gfid"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("provq.api"), name)
    raise AttributeError(f"module 'provq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
