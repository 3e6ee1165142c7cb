"""A Hugging Face model's config.json: read, merged with its text config, and checked before any weight is read."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmquant.errors import InputError


@dataclass(frozen=True)
class ModelConfig:
    """config.json of a model folder (a nested ``text_config`` lifted to the top, as llama.cpp's converter does)."""

    folder: Path
    hparams: dict[str, Any]
    hf_architecture: str

    def get(self, *keys: str, default: Any = None) -> Any:
        """The first of ``keys`` present in config.json, else ``default``."""
        for key in keys:
            if self.hparams.get(key) is not None:
                return self.hparams[key]
        return default

    def require(self, *keys: str) -> Any:
        value = self.get(*keys)
        if value is None:
            raise InputError(
                f"{self.folder / 'config.json'}: missing '{keys[0]}' (needed for {self.hf_architecture}); "
                "is the file complete?"
            )
        return value

    @property
    def n_layers(self) -> int:
        return int(self.require("num_hidden_layers", "n_layers", "n_layer"))

    @property
    def hidden_size(self) -> int:
        return int(self.require("hidden_size", "n_embd"))

    @property
    def n_head(self) -> int:
        return int(self.require("num_attention_heads", "n_head"))

    @property
    def n_head_kv(self) -> int:
        return int(self.get("num_key_value_heads", "n_head_kv", default=self.n_head))

    @property
    def head_dim(self) -> int:
        return int(self.get("head_dim", default=self.hidden_size // self.n_head))

    @property
    def vocab_size(self) -> int:
        return int(self.require("vocab_size"))

    @property
    def rope_parameters(self) -> dict[str, Any]:
        """transformers 5 writes ``rope_parameters``; older configs ``rope_scaling`` plus a top-level ``rope_theta``."""
        params = dict(self.hparams.get("rope_parameters") or self.hparams.get("rope_scaling") or {})
        if "full_attention" in params:  # per-layer-type parameters (Gemma 3): the global layers' set
            params = dict(params["full_attention"])
        if "rope_type" not in params and "type" in params:
            params["rope_type"] = params["type"]
        if "rope_theta" not in params and self.hparams.get("rope_theta") is not None:
            params["rope_theta"] = self.hparams["rope_theta"]
        return params


def read_config(folder: Path) -> ModelConfig:
    """config.json of ``folder``, with one clear error for a missing, corrupt or arch-less file."""
    path = folder / "config.json"
    if not path.is_file():
        raise InputError(f"{path}: missing; a Hugging Face model folder needs config.json next to its weights")
    try:
        hparams = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); re-download the file") from None
    if not isinstance(hparams, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(hparams).__name__}")
    architectures = hparams.get("architectures") or []
    if not architectures or not isinstance(architectures, list):
        raise InputError(f"{path}: no 'architectures' entry, so the model type is unknown")
    if isinstance(hparams.get("text_config"), dict):  # multimodal wrappers: the language model's settings
        hparams = {**hparams, **hparams["text_config"]}
    return ModelConfig(folder=folder, hparams=hparams, hf_architecture=str(architectures[0]))
