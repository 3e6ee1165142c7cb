"""Q8_0, Q4_0, Q5_0: byte-identical with ggml (reference path and imatrix path) and exact dequantization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from llmquant.formats import FORMATS, dequantize, quantize
from llmquant.oracles.ggml import ggml_quantize
from tests.formats.compare import compare_with_ggml, heavy_tailed, random_imatrix

SYMMETRIC_LEGACY = ["Q8_0", "Q4_0", "Q5_0"]


@pytest.mark.parametrize("type_name", SYMMETRIC_LEGACY)
def test_bytes_match_ggml_on_heavy_tailed_weights(type_name: str):
    compare_with_ggml(heavy_tailed(128, 576), type_name).assert_matches(min_identical=1.0)


@pytest.mark.parametrize("type_name", SYMMETRIC_LEGACY)
def test_bytes_match_ggml_with_imatrix(type_name: str):
    compare_with_ggml(heavy_tailed(128, 576, seed=2), type_name, random_imatrix(576)).assert_matches(min_identical=1.0)


@pytest.mark.parametrize("type_name", SYMMETRIC_LEGACY)
def test_bytes_match_ggml_on_real_weights(type_name: str, smollm2_weights):
    w = smollm2_weights["model.layers.29.mlp.gate_proj.weight"][:512]
    compare_with_ggml(w, type_name).assert_matches(min_identical=1.0)


@pytest.mark.parametrize("type_name", SYMMETRIC_LEGACY)
def test_bytes_match_ggml_on_real_weights_with_imatrix(type_name: str, smollm2_weights):
    w = smollm2_weights["model.layers.0.self_attn.q_proj.weight"]
    compare_with_ggml(w, type_name, random_imatrix(w.shape[1], seed=3)).assert_matches(min_identical=1.0)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q5_0"])
def test_imatrix_path_uses_the_mean_square_of_the_whole_row(type_name: str):
    # ggml weighs by sqrt(sigma2 + x²) with sigma2 over the row: rows of one block and of many blocks differ
    w = heavy_tailed(16, 1024, seed=4)
    w[:, :32] *= 50.0  # a loud first block changes every block's sigma2
    imatrix = random_imatrix(1024, seed=5)
    assert np.array_equal(quantize(w, type_name, imatrix), ggml_quantize(w, type_name, imatrix))


@pytest.mark.parametrize("type_name", ["Q4_0", "Q5_0"])
def test_bare_blocks_with_importance_act_as_one_block_rows(type_name: str):
    w = heavy_tailed(64, 32, seed=6)
    imatrix = random_imatrix(32, seed=7)
    blocks = FORMATS[type_name].quantize_blocks(torch.from_numpy(w), torch.from_numpy(np.tile(imatrix, (64, 1))))
    assert np.array_equal(blocks.numpy(), ggml_quantize(w, type_name, imatrix))


@pytest.mark.parametrize("type_name", SYMMETRIC_LEGACY)
def test_zero_and_tied_blocks_match_ggml(type_name: str):
    w = heavy_tailed(8, 256, seed=8)
    w[0] = 0.0
    w[1, :32] = -0.0
    w[2, :32] = 0.5
    w[2, 32:64] = np.where(np.arange(32) % 2, 0.25, -0.25)
    w[3, :32] = np.linspace(-1, 1, 32)
    w[4, :32] = np.linspace(1, -1, 32)
    w[5, :32] = 1e-30
    imatrix = random_imatrix(256, seed=9)
    for importance in (None, imatrix):
        assert np.array_equal(quantize(w, type_name, importance), ggml_quantize(w, type_name, importance))


@pytest.mark.parametrize("type_name", SYMMETRIC_LEGACY)
def test_denormal_blocks_match_ggml(type_name: str):
    # a denormal scale has an infinite inverse: ggml's float→int8 conversion then writes level byte 0
    rng = np.random.default_rng(12)
    w = (rng.standard_normal((4, 256)) * 1e-39).astype(np.float32)
    w[2:, ::2] = heavy_tailed(2, 128, seed=13)
    w[0, :8] = np.float32(1e-45)
    for importance in (None, random_imatrix(256, seed=14)):
        assert np.array_equal(quantize(w, type_name, importance), ggml_quantize(w, type_name, importance))


def test_q8_0_ignores_the_imatrix():
    w = heavy_tailed(32, 256, seed=10)
    assert np.array_equal(quantize(w, "Q8_0", random_imatrix(256)), quantize(w, "Q8_0"))


@pytest.mark.parametrize("type_name", SYMMETRIC_LEGACY)
def test_dequantize_equals_gguf_reference(type_name: str):
    w = heavy_tailed(64, 576, seed=11)
    for importance in (None, random_imatrix(576)):
        data = quantize(w, type_name, importance)
        reference = gguf_quants.dequantize(data, GGMLQuantizationType[type_name]).reshape(w.shape)
        assert np.array_equal(dequantize(data, type_name, w.shape), reference)
