"""The ggml oracle: ggml_quantize_chunk from llama-cpp-python's bundled libggml-base, reached with ctypes."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from llmquant.oracles.ggml import ggml_quantize, ggml_requires_imatrix


def heavy_tailed(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_t(df=3, size=(rows, cols)) * 0.02).astype(np.float32)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q8_0"])
def test_oracle_matches_gguf_py_reference_quantizer(type_name: str):
    w = heavy_tailed(64, 512)
    ours = ggml_quantize(w, type_name)
    reference = gguf_quants.quantize(w, GGMLQuantizationType[type_name])
    assert ours.dtype == np.uint8 and ours.shape == reference.shape
    assert np.array_equal(ours, reference)


@pytest.mark.parametrize("type_name", ["Q4_K", "Q6_K", "IQ4_XS", "Q5_1"])
def test_oracle_output_dequantizes_close_to_the_input(type_name: str):
    w = heavy_tailed(16, 1024, seed=1)
    data = ggml_quantize(w, type_name)
    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    assert data.shape == (16, 1024 // block * nbytes)
    back = gguf_quants.dequantize(data, GGMLQuantizationType[type_name])
    rel = np.linalg.norm(back - w) / np.linalg.norm(w)
    assert rel < 0.15


def test_oracle_uses_the_importance_matrix():
    w = heavy_tailed(32, 512, seed=2)
    rng = np.random.default_rng(3)
    imatrix = rng.exponential(size=512).astype(np.float32) ** 2
    plain = ggml_quantize(w, "Q4_K")
    weighted = ggml_quantize(w, "Q4_K", imatrix=imatrix)
    assert not np.array_equal(plain, weighted)

    def weighted_error(data):
        back = gguf_quants.dequantize(data, GGMLQuantizationType.Q4_K)
        return float((imatrix * (back - w) ** 2).sum())

    assert weighted_error(weighted) < weighted_error(plain)


def test_oracle_knows_which_types_require_an_imatrix():
    assert ggml_requires_imatrix("IQ2_XXS")
    assert not ggml_requires_imatrix("Q4_K")


def test_oracle_rejects_a_row_length_off_the_block_size():
    with pytest.raises(ValueError, match="multiple of the block size"):
        ggml_quantize(np.zeros((2, 100), np.float32), "Q4_K")
