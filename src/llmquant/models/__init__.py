"""Hugging Face model folders: resolving names, the demo model, config and weights."""

from llmquant.models.demo import DEMO_MODEL_NAME, demo_gguf_path, resolve_gguf, resolve_model

__all__ = ["DEMO_MODEL_NAME", "demo_gguf_path", "resolve_gguf", "resolve_model"]
