"""Q4_1, Q5_1 (scale + min legacy formats): byte-identical with ggml on both paths, exact dequantization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from llmquant.formats import FORMATS, dequantize, quantize
from llmquant.oracles.ggml import ggml_quantize
from tests.formats.compare import compare_with_ggml, heavy_tailed, random_imatrix

AFFINE_LEGACY = ["Q4_1", "Q5_1"]



@pytest.mark.parametrize("type_name", AFFINE_LEGACY)
def test_bytes_match_ggml_on_heavy_tailed_weights(type_name: str):
    compare_with_ggml(heavy_tailed(128, 576, seed=30), type_name).assert_matches(min_identical=1.0)


@pytest.mark.parametrize("type_name", AFFINE_LEGACY)
def test_bytes_match_ggml_with_imatrix(type_name: str):
    w = heavy_tailed(128, 576, seed=31)
    compare_with_ggml(w, type_name, random_imatrix(576, seed=32)).assert_matches(min_identical=1.0)


@pytest.mark.parametrize("type_name", AFFINE_LEGACY)
def test_bytes_match_ggml_on_real_weights(type_name: str, smollm2_weights):
    w = smollm2_weights["model.layers.29.mlp.gate_proj.weight"][:512]
    compare_with_ggml(w, type_name).assert_matches(min_identical=1.0)


@pytest.mark.parametrize("type_name", AFFINE_LEGACY)
def test_bytes_match_ggml_on_real_weights_with_imatrix(type_name: str, smollm2_weights):
    w = smollm2_weights["model.layers.0.self_attn.q_proj.weight"][:256]
    compare_with_ggml(w, type_name, random_imatrix(w.shape[1], seed=33)).assert_matches(min_identical=1.0)


@pytest.mark.parametrize("type_name", AFFINE_LEGACY)
def test_bytes_match_ggml_on_real_down_proj(type_name: str, smollm2_down_proj):
    w = smollm2_down_proj[:128]
    for imatrix in (None, random_imatrix(w.shape[1], seed=34)):
        compare_with_ggml(w, type_name, imatrix).assert_matches(min_identical=1.0)


@pytest.mark.parametrize("type_name", AFFINE_LEGACY)
def test_dequantize_equals_gguf_reference(type_name: str):
    w = heavy_tailed(32, 576, seed=35)
    for imatrix in (None, random_imatrix(576, seed=36)):
        data = quantize(w, type_name, imatrix)
        expected = gguf_quants.dequantize(data, GGMLQuantizationType[type_name]).reshape(w.shape)
        assert np.array_equal(dequantize(data, type_name, w.shape), expected)


@pytest.mark.parametrize("type_name", AFFINE_LEGACY)
def test_imatrix_path_uses_the_mean_square_of_the_whole_row(type_name: str):
    # ggml weighs by sqrt(sigma2 + x²) with sigma2 over the row: a loud first block changes every block's weights
    w = heavy_tailed(16, 1024, seed=37)
    w[:, :32] *= 50.0
    imatrix = random_imatrix(1024, seed=38)
    assert np.array_equal(quantize(w, type_name, imatrix), ggml_quantize(w, type_name, imatrix))


@pytest.mark.parametrize("type_name", AFFINE_LEGACY)
def test_bare_blocks_with_importance_act_as_one_block_rows(type_name: str):
    w = heavy_tailed(64, 32, seed=39)
    imatrix = random_imatrix(32, seed=40)
    blocks = FORMATS[type_name].quantize_blocks(torch.from_numpy(w), torch.from_numpy(np.tile(imatrix, (64, 1))))
    assert np.array_equal(blocks.numpy(), ggml_quantize(w, type_name, imatrix))


@pytest.mark.parametrize("type_name", AFFINE_LEGACY)
def test_signed_zeros_and_constant_blocks_match_ggml(type_name: str):
    # ggml keeps the first of tied minima/maxima: +0 and -0 decide the sign of the stored min and scale
    w = heavy_tailed(6, 256, seed=41)
    w[0] = 0.0
    w[0, ::3] = -0.0
    w[1, :32] = -0.0
    w[1, 5] = 0.0
    w[2, :32] = np.abs(w[2, :32])
    w[2, 0] = -0.0
    w[3, :32] = 0.5
    w[3, 32:64] = -0.25
    w[4, :32] = 1e-39  # denormal: the inverse scale is infinite
    imatrix = random_imatrix(256, seed=42)
    for importance in (None, imatrix):
        assert np.array_equal(quantize(w, type_name, importance), ggml_quantize(w, type_name, importance))


@pytest.mark.parametrize("type_name", AFFINE_LEGACY)
def test_signed_zero_extremes_and_denormal_scales_take_ggmls_choice(type_name: str):
    # the fast reference path asks torch for min/max; a tie of +0 and -0 (either order, as min or as max) and
    # a denormal or overflowing scale must still give ggml's bytes
    rows = np.zeros((8, 32), dtype=np.float32)
    rows[0, :2] = [-0.0, 0.0]
    rows[0, 2:] = np.linspace(0.1, 3.0, 30)
    rows[1, :2] = [0.0, -0.0]
    rows[1, 2:] = np.linspace(0.1, 3.0, 30)
    rows[2, :2] = [-0.0, 0.0]
    rows[2, 2:] = -np.linspace(0.1, 3.0, 30)
    rows[3, :2] = [0.0, -0.0]
    rows[3, 2:] = -np.linspace(0.1, 3.0, 30)
    rows[4, :] = -0.0
    rows[4, 5] = 0.0
    rows[5, :] = np.linspace(0, 1e-44, 32)  # denormal scale
    rows[6, :] = np.linspace(-3e38, 3e38, 32)  # max - min overflows
    rows[7, :] = 1.5  # constant: zero scale
    weights = np.tile(rows, (1, 2))
    for row in range(len(weights)):  # one call per row: one odd row would send a whole chunk the slow way
        one = weights[row:row + 1]
        assert np.array_equal(quantize(one, type_name), ggml_quantize(one, type_name)), row
