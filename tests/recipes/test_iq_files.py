"""Whole files of the 1-3-bit i-quant file types against llama.cpp's ``llama_model_quantize`` with the same
imatrix: the same tensor types, every block byte-identical, the same size; the file loads and generates.

Every file type also runs on the tiny k-quant-friendly model in tests/pipeline/test_quantize.py (its list is
``supported_file_types()``, so the new types joined it when their formats were registered); here SmolLM2
(ffn_down 1536 wide; the 576-wide tensors fall back to IQ4_NL as in llama.cpp) and the refusal without an imatrix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from llmquant.errors import LlmquantError
from llmquant.pipeline.quantize import quantize_model
from tests.models.llama_cpp_run import llama_cpp_logits, load_llama_cpp
from tests.pipeline.test_quantize import quantize_both, random_imatrix, tensors_of

# llama.cpp's IQ2_XXS mix: IQ2_XXS ffn_down, Q2_K for the first eighth and attn_v, Q5_K output (SmolLM2)
SMOLLM2_TYPES = ["IQ2_XXS"]


@pytest.mark.slow  # about 3 minutes on 2 shared cores: llama.cpp's own IQ2_XXS search of SmolLM2 is most of it
@pytest.mark.parametrize("file_type", SMOLLM2_TYPES)
def test_smollm2_low_bit_file_is_llama_cpps_and_generates(file_type, smollm2_f32_gguf: Path, tmp_path: Path):
    ours, theirs = quantize_both(smollm2_f32_gguf, tmp_path, file_type, random_imatrix(smollm2_f32_gguf))
    a, b = tensors_of(ours), tensors_of(theirs)
    assert list(a) == list(b)
    for name, (their_type, their_bytes) in b.items():
        our_type, our_bytes = a[name]
        assert our_type == their_type, f"{name}: {our_type} vs llama.cpp's {their_type}"
        block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[our_type]][1]
        differing = (our_bytes.reshape(-1, block_bytes) != their_bytes.reshape(-1, block_bytes)).any(axis=1)
        assert not differing.any(), f"{name} ({our_type}): {int(differing.sum())} blocks differ"
    assert file_type in {t for t, _ in a.values()}
    assert ours.stat().st_size == theirs.stat().st_size
    logits = llama_cpp_logits(load_llama_cpp(ours, n_ctx=64), list(range(5, 20)))
    assert np.isfinite(logits).all()


@pytest.mark.parametrize("file_type", ["IQ2_XXS", "IQ1_S", "IQ3_XXS"])
def test_a_low_bit_type_is_refused_without_an_imatrix(file_type, tiny_llama_f32_gguf: Path, tmp_path: Path):
    with pytest.raises(LlmquantError, match=r"needs an importance matrix.*--imatrix FILE or --calib TEXT"):
        quantize_model(tiny_llama_f32_gguf, tmp_path / "out.gguf", file_type)
    assert list(tmp_path.iterdir()) == []
