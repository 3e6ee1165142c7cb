"""Builders for test models: tiny random Hugging Face models of several architectures."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

# Widths are multiples of 256 so true k-quants apply; two layers keep them fast.
_COMMON = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5)

TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(_COMMON, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(_COMMON, tie_word_embeddings=True)),
}


def build_tiny_model(arch: str, target: Path, tokenizer_from: Path, seed: int = 0) -> Path:
    """A random model of ``arch`` saved as a Hugging Face folder (f32 safetensors) with a copied tokenizer.

    Cached: returns ``target`` at once if it already holds a model.
    """
    config_cls_name, kwargs = TINY_CONFIGS[arch]
    return build_random_model(config_cls_name, kwargs, target, tokenizer_from, seed)


def build_random_model(config_cls_name: str, kwargs: dict, target: Path, tokenizer_from: Path, seed: int = 0) -> Path:
    """A random model of transformers' ``config_cls_name`` with ``kwargs`` (vocabulary and special tokens from
    ``tokenizer_from``'s tokenizer, copied along), saved as f32 safetensors; cached like ``build_tiny_model``."""
    if (target / "config.json").is_file():
        return target
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    config = getattr(transformers, config_cls_name)(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **kwargs,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
