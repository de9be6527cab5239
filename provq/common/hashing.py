"""The project's one way to hash: structured values, files and tensors, each with sha256.

The byte layouts are frozen: dataset fingerprints key the statistics cache, tokenizer fingerprints
bind codes and priors to their tokenizer, and the Inception checksum stamps every FID's protocol."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import torch


def digest(*parts) -> str:
    """sha256 over the parts' reprs, each closed by a NUL byte (fingerprints of datasets and caches)."""
    sha = hashlib.sha256()
    for part in parts:
        sha.update(repr(part).encode())
        sha.update(b"\0")
    return sha.hexdigest()


def files_digest(paths: Iterable[str | Path], prefix: str = "") -> str:
    """sha256 over ``prefix`` and then each file's bytes, in the order given."""
    sha = hashlib.sha256(prefix.encode())
    for path in paths:
        sha.update(Path(path).read_bytes())
    return sha.hexdigest()


def update_with_tensors(sha, state: dict[str, torch.Tensor], header: bool = True, as_float32: bool = False,
                        skip=lambda name: False) -> None:
    """Feed ``state``'s tensors to ``sha`` in name order: with ``header``, ``name|dtype|shape|`` before the
    bytes (the tokenizer fingerprint); without, the name alone, and the values as float32 with
    ``as_float32`` (the Inception checksum, whatever dtype its file held)."""
    for name in sorted(state):
        if skip(name):
            continue
        tensor = state[name].detach()
        tensor = (tensor.to(torch.float32) if as_float32 else tensor).contiguous().cpu()
        sha.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode() if header else name.encode())
        sha.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
