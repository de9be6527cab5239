"""save_pretrained / from_pretrained for a module built from one dataclass config.

A folder holds ``config.json`` (``model_type``, ``config_version`` and the config's fields) and
``model.safetensors``. huggingface_hub's ModelHubMixin would rebuild nested dataclass configs
as plain dicts and has no format version, so the tokenizer and the prior share this instead.
Fields added to a config after version 1 default to the behaviour files without them had,
so older folders load as they were.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from common.errors import ConfigError, FormatError
from common.files import (
    load_weights,
    read_versioned,
    resolve_files,
    save_weights,
    write_json_atomic,
)
from common.typed_config import build_config, config_to_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
VERSION_KEY = "config_version"


class PretrainedMixin:
    """For ``nn.Module`` subclasses built as ``cls(config)`` that keep it as ``self.config``."""

    config_class: type
    config_version: int = 1
    model_type: str

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (no pickle); returns the folder."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        record = {"model_type": self.model_type, VERSION_KEY: self.config_version,
                  **config_to_dict(self.config)}
        save_weights(self, directory / WEIGHTS_NAME)
        write_json_atomic(directory / CONFIG_NAME, record)  # last: the folder is complete once it is there
        return directory

    @classmethod
    def read_config(cls, path: str | os.PathLike):
        """The config of a saved folder; refuses another model type, a newer version, unknown fields."""
        data, version = read_versioned(path, VERSION_KEY, cls.config_version)
        model_type = data.pop("model_type", cls.model_type)  # files of 0.1.0 tokenizers had none
        if model_type != cls.model_type:
            raise FormatError(f"{path} holds a {model_type!r}, not a {cls.model_type!r}")
        try:
            return build_config(cls.config_class, cls.upgrade_config(data, version))
        except ConfigError as error:
            raise FormatError(f"{path}: {error}") from error

    @classmethod
    def upgrade_config(cls, data: dict, version: int) -> dict:
        """The fields of a config written at an older ``version``, as this version names them."""
        return data

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
                        revision: str | None = None):
        """Load a folder written by ``save_pretrained``, or a Hub repo id (when online), in eval mode."""
        config_file, weights_file = resolve_files(name_or_path, (CONFIG_NAME, WEIGHTS_NAME),
                                                  cls.model_type, revision)
        model = cls(cls.read_config(config_file))
        load_weights(model, weights_file)
        return model.to(device).eval()
