"""Q3_K and Q6_K: byte-identical with ggml (reference and imatrix paths) and exact dequantization."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from llmquant.formats import dequantize, quantize
from llmquant.oracles.ggml import ggml_quantize
from tests.formats.compare import compare_with_ggml, heavy_tailed, random_imatrix

SYMMETRIC_K = ["Q3_K", "Q6_K"]


@pytest.mark.parametrize("type_name", SYMMETRIC_K)
def test_bytes_match_ggml_on_heavy_tailed_weights(type_name: str):
    compare_with_ggml(heavy_tailed(64, 1536), type_name).assert_matches(min_identical=1.0)


@pytest.mark.parametrize("type_name", SYMMETRIC_K)
def test_bytes_match_ggml_with_imatrix(type_name: str):
    w = heavy_tailed(64, 1536, seed=2)
    compare_with_ggml(w, type_name, random_imatrix(1536)).assert_matches(min_identical=1.0)


@pytest.mark.parametrize("type_name", SYMMETRIC_K)
def test_bytes_match_ggml_on_real_weights(type_name: str, smollm2_down_proj):
    compare_with_ggml(smollm2_down_proj[:192], type_name).assert_matches(min_identical=1.0)


@pytest.mark.parametrize("type_name", SYMMETRIC_K)
def test_bytes_match_ggml_on_real_weights_with_imatrix(type_name: str, smollm2_down_proj):
    w = smollm2_down_proj[192:384]
    compare_with_ggml(w, type_name, random_imatrix(w.shape[1], seed=3)).assert_matches(min_identical=1.0)


@pytest.mark.parametrize("type_name", SYMMETRIC_K)
def test_zero_and_tiny_blocks_match_ggml(type_name: str):
    w = heavy_tailed(6, 512, seed=4)
    w[0] = 0.0  # whole super-blocks of zeros
    w[1, :16] = 0.0  # one zero sub-block among normal ones
    w[1, 256:272] = -0.0
    w[2, :256] = 1e-20  # scales below ggml's GROUP_MAX_EPS
    w[3, :256] = np.where(np.arange(256) % 3 == 0, 0.5, -0.5)  # ties everywhere
    w[4, 16:32] = 1e3  # one loud sub-block: the others' 6-bit scales round to 0
    imatrix = random_imatrix(512, seed=5)
    imatrix[32:48] = 0.0  # sub-blocks with no importance at all
    for importance in (None, imatrix):
        assert np.array_equal(quantize(w, type_name, importance), ggml_quantize(w, type_name, importance))


@pytest.mark.parametrize("type_name", SYMMETRIC_K)
def test_dequantize_equals_gguf_reference(type_name: str):
    w = heavy_tailed(32, 1024, seed=6)
    for importance in (None, random_imatrix(1024)):
        data = quantize(w, type_name, importance)
        reference = gguf_quants.dequantize(data, GGMLQuantizationType[type_name]).reshape(w.shape)
        assert np.array_equal(dequantize(data, type_name, w.shape), reference)
