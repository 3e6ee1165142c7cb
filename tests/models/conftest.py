"""Fixtures of the converter's tests: one tiny random model per supported architecture, with a trained tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.models.tiny_models import TINY_ARCHS, build_tiny


@pytest.fixture(scope="session", params=sorted(TINY_ARCHS))
def tiny_arch_hf(request, test_cache: Path) -> tuple[str, Path]:
    """(architecture, folder) for each tiny model in turn."""
    return request.param, build_tiny(request.param, test_cache / f"convert-tiny-{request.param}")


@pytest.fixture(scope="session")
def tiny_bpe_llama_hf(test_cache: Path) -> Path:
    return build_tiny("llama", test_cache / "convert-tiny-llama")
