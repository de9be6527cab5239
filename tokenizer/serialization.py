"""config.json + model.safetensors for the tokenizer: writing, reading, checking, fingerprinting."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CONFIG_VERSION = 1  # bump when a saved config.json changes meaning


class PretrainedError(ValueError):
    """A saved tokenizer that cannot be loaded: bad version, unknown field, missing/mismatched tensor."""


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def canonical_json(data: dict) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def config_from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a plain mapping, recursing into nested dataclass fields."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise PretrainedError(f"unknown config field '{prefix}{unknown[0]}'")
    kwargs = {}
    for name, value in data.items():
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict):
            value = config_from_dict(hints[name], value, f"{prefix}{name}.")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:  # a value the config's own checks refuse
        raise PretrainedError(f"config {prefix.rstrip('.') or cls.__name__}: {error}") from error


def read_config(path: Path, cls):
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise PretrainedError(f"{path} is not a JSON config ({error})") from error
    if not isinstance(data, dict):
        raise PretrainedError(f"{path}: expected a JSON object, got {type(data).__name__}")
    version = data.pop("config_version", None)
    if not isinstance(version, int) or isinstance(version, bool):
        raise PretrainedError(f"{path} has no integer 'config_version' (got {version!r})")
    if version < 1:
        raise PretrainedError(f"{path} has an unknown config_version {version}")
    if version > CONFIG_VERSION:
        raise PretrainedError(
            f"{path} has config_version {version}, newer than this library's "
            f"{CONFIG_VERSION}: upgrade provq to load it"
        )
    return config_from_dict(cls, data)


def write_config(config, path: Path) -> None:
    data = {"config_version": CONFIG_VERSION, **config_to_dict(config)}
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_weights(module: torch.nn.Module, path: Path) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def load_weights(module: torch.nn.Module, path: Path) -> None:
    """Load safetensors into `module`, naming the first missing, unexpected or mismatched tensor.

    Only the safetensors format is read (no pickle, so nothing in the file is ever executed):
    a truncated file, or a pickle / torch.save file under this name, is refused.
    """
    try:
        tensors = load_file(str(path))
    except SafetensorError as error:
        raise PretrainedError(
            f"{path} is not a complete safetensors file ({error}); it may be truncated, or a "
            "pickle/.bin checkpoint renamed (those are never loaded: convert with safetensors)"
        ) from error
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise PretrainedError(f"{path} lacks tensor '{missing[0]}' ({len(missing)} missing in all)")
    if unexpected:
        raise PretrainedError(f"{path} has unexpected tensor '{unexpected[0]}' ({len(unexpected)} in all)")
    for name, want in expected.items():
        got = tensors[name]
        if got.shape != want.shape:
            raise PretrainedError(
                f"{path}: tensor '{name}' has shape {tuple(got.shape)}, "
                f"the config expects {tuple(want.shape)}"
            )
    module.load_state_dict(tensors, strict=True)


def fingerprint(config, module: torch.nn.Module) -> str:
    """sha256 over the canonical config JSON and every exported tensor (name, dtype, shape, bytes)."""
    digest = hashlib.sha256()
    digest.update(canonical_json({"config_version": CONFIG_VERSION, **config_to_dict(config)}).encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def resolve_files(name_or_path: str | os.PathLike, revision: str | None = None) -> tuple[Path, Path]:
    """(config.json, model.safetensors) from a local folder or, failing that, a Hub repo id."""
    folder = Path(name_or_path)
    if folder.is_dir():
        files = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        for file in files:
            if not file.is_file():
                raise PretrainedError(f"{folder} has no {file.name}")
        return files
    if folder.exists() or str(name_or_path).startswith((".", "/")) or str(name_or_path).count("/") != 1:
        raise PretrainedError(f"{name_or_path} is neither a tokenizer folder nor a Hub repo id")
    from huggingface_hub import hf_hub_download

    try:
        return tuple(
            Path(hf_hub_download(str(name_or_path), name, revision=revision))
            for name in (CONFIG_NAME, WEIGHTS_NAME)
        )
    except Exception as error:  # offline, unknown repo, missing file: one clear message
        raise PretrainedError(f"could not fetch {name_or_path} from the Hugging Face Hub: {error}") from error
