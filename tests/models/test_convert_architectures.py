"""Every supported architecture: a tiny random model converts, and llama.cpp tokenizes and predicts as transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmquant.errors import InputError
from llmquant.pipeline.convert import convert_model
from tests.models.llama_cpp_run import TEST_TEXT, hf_logits, hf_tokens, llama_cpp_logits, load_llama_cpp

# ggml's CPU GELU reads an F16 lookup table (GGML_GELU_FP16 in ggml-cpu/vec.h), so Gemma's logits carry ~3e-3 of
# llama.cpp's own rounding; every other architecture is SiLU and matches to float32 precision.
LOGIT_TOLERANCE = {"gemma2": 1e-2, "gemma3": 1e-2}


@pytest.fixture(scope="module")
def converted(tiny_arch_hf, tmp_path_factory) -> tuple[str, Path, Path]:
    arch, folder = tiny_arch_hf
    out = tmp_path_factory.mktemp(f"convert-{arch}") / f"{arch}-f32.gguf"
    convert_model(folder, out, outtype="f32")
    return arch, folder, out


def test_llama_cpp_tokenizes_like_transformers(converted):
    arch, folder, gguf_file = converted
    llm = load_llama_cpp(gguf_file)
    assert llm.tokenize(TEST_TEXT.encode(), add_bos=False, special=False) == hf_tokens(folder)


def test_llama_cpp_logits_match_transformers(converted):
    arch, folder, gguf_file = converted
    ids = hf_tokens(folder)
    reference = hf_logits(folder, ids)
    logits = llama_cpp_logits(load_llama_cpp(gguf_file), ids)
    assert np.abs(reference).max() > 1.0  # sharp enough that a wrong tensor transform would show
    assert np.abs(logits - reference).max() < LOGIT_TOLERANCE.get(arch, 1e-3)


def test_unsupported_architecture_is_named_with_the_supported_ones(tiny_bpe_llama_hf: Path, tmp_path: Path):
    import json
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_bpe_llama_hf, folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="FalconForCausalLM is not supported.*LlamaForCausalLM.*Qwen3MoeForCausalLM"):
        convert_model(folder, tmp_path / "out.gguf")
    assert not list(tmp_path.glob("*.gguf*"))
