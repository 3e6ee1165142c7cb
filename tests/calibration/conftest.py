"""Fixtures for the calibration tests: tiny random MoE models built in memory (no tokenizer needed)."""

from __future__ import annotations

import pytest
import torch

# Two layers, 4 experts, top-2: small enough to run in milliseconds, big enough that routing is uneven
_MOE_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   num_experts_per_tok=2, max_position_embeddings=256, tie_word_embeddings=False)
MOE_CONFIGS = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(_MOE_COMMON, num_experts=4, moe_intermediate_size=96, intermediate_size=128,
                                         head_dim=16, norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", dict(_MOE_COMMON, num_local_experts=4, intermediate_size=96)),
}


@pytest.fixture(scope="module", params=sorted(MOE_CONFIGS))
def tiny_moe(request) -> torch.nn.Module:
    """A tiny random MoE causal LM (Qwen3-MoE, then Mixtral) in float32, eval mode."""
    import transformers

    config_name, kwargs = MOE_CONFIGS[request.param]
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
