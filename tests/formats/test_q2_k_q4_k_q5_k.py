"""Q2_K, Q4_K, Q5_K (scale + min k-quants): byte-identical with ggml on both paths, exact dequantization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from llmquant.formats import dequantize, quantize
from llmquant.formats.kquants import pack_k4_scales, unpack_k4_scales
from llmquant.oracles.ggml import ggml_quantize
from tests.formats.compare import compare_with_ggml, heavy_tailed, random_imatrix

SCALE_MIN_KQUANTS = ["Q2_K", "Q4_K", "Q5_K"]



@pytest.mark.parametrize("type_name", SCALE_MIN_KQUANTS)
def test_bytes_match_ggml_on_heavy_tailed_weights(type_name: str):
    compare_with_ggml(heavy_tailed(96, 1536, seed=20), type_name).assert_matches(min_identical=1.0)


@pytest.mark.parametrize("type_name", SCALE_MIN_KQUANTS)
def test_bytes_match_ggml_with_imatrix(type_name: str):
    w = heavy_tailed(96, 1536, seed=21)
    compare_with_ggml(w, type_name, random_imatrix(1536, seed=22)).assert_matches(min_identical=1.0)


@pytest.mark.parametrize("type_name", SCALE_MIN_KQUANTS)
def test_bytes_match_ggml_on_real_weights(type_name: str, smollm2_down_proj):
    compare_with_ggml(smollm2_down_proj[:192], type_name).assert_matches(min_identical=1.0)


@pytest.mark.parametrize("type_name", SCALE_MIN_KQUANTS)
def test_bytes_match_ggml_on_real_weights_with_imatrix(type_name: str, smollm2_down_proj):
    w = smollm2_down_proj[192:384]
    compare_with_ggml(w, type_name, random_imatrix(w.shape[1], seed=23)).assert_matches(min_identical=1.0)


@pytest.mark.parametrize("type_name", SCALE_MIN_KQUANTS)
def test_dequantize_equals_gguf_reference(type_name: str, smollm2_down_proj):
    w = smollm2_down_proj[:64]
    data = quantize(w, type_name, random_imatrix(w.shape[1], seed=24))
    expected = gguf_quants.dequantize(data, GGMLQuantizationType[type_name]).reshape(w.shape)
    assert np.array_equal(dequantize(data, type_name, w.shape), expected)


@pytest.mark.parametrize("type_name", SCALE_MIN_KQUANTS)
def test_zero_constant_and_tiny_sub_blocks_match_ggml(type_name: str):
    w = heavy_tailed(6, 512, seed=25)
    w[0] = 0.0
    w[1, :32] = 0.5  # a constant positive sub-block: min clamps to 0
    w[1, 32:64] = -0.25  # a constant negative sub-block: max == min
    w[2, :256] = np.linspace(-1, 1, 256)
    w[3, :16] = 1e-30
    w[4, 256:] = np.abs(w[4, 256:])  # all-positive super-block
    for importance in (None, random_imatrix(512, seed=26)):
        assert np.array_equal(quantize(w, type_name, importance), ggml_quantize(w, type_name, importance))


def test_k4_scale_packing_round_trips_all_6_bit_values():
    # get_scale_min_k4's layout: 8 six-bit scales and 8 six-bit mins in 12 bytes
    levels = torch.arange(64).reshape(8, 8)
    packed = pack_k4_scales(levels, 63 - levels)
    scales, mins = unpack_k4_scales(packed)
    assert packed.shape == (8, 12)
    assert torch.equal(scales, levels) and torch.equal(mins, 63 - levels)
