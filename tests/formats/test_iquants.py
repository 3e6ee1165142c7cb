"""IQ4_NL and IQ4_XS against ggml's bytes (quantize_iq4_nl / quantize_iq4_xs), with and without an imatrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from llmquant.formats import FORMATS, dequantize, quantize
from llmquant.formats.base import Grid
from llmquant.formats.iquants import IQ4_LEVELS, best_index_int8
from llmquant.oracles.ggml import ggml_quantize
from tests.formats.compare import compare_with_ggml, heavy_tailed, random_imatrix

IQ4_TYPES = ["IQ4_NL", "IQ4_XS"]


def reference_best_index_int8(x: np.float32) -> int:
    """ggml-quants.c's best_index_int8 over kvalues_iq4nl, step by step in float32 (the test's reference)."""
    values = [np.float32(v) for v in IQ4_LEVELS]
    if x <= values[0]:
        return 0
    if x >= values[-1]:
        return len(values) - 1
    low, high = 0, len(values) - 1
    while high - low > 1:
        middle = (low + high) // 2
        if x < values[middle]:
            high = middle
        else:
            low = middle
    return high - 1 if np.float32(x - values[high - 1]) < np.float32(values[high] - x) else high


_IQ4_VALUES = np.array(IQ4_LEVELS, dtype=np.float32)


def nearest_level_index(scaled: torch.Tensor) -> torch.Tensor:
    """Grid.nearest on the IQ4 grid under unit scales: the nearest level of each value, ties upward."""
    flat = scaled.reshape(1, -1)
    grid = Grid(torch.ones_like(flat), None, torch.from_numpy(_IQ4_VALUES))
    return grid.nearest(flat).reshape(scaled.shape)


def numba_best_index_int8(x: np.ndarray) -> np.ndarray:
    """The module's numba best_index_int8 (what the searches call) on each value."""
    return np.array([best_index_int8(_IQ4_VALUES, np.float32(v)) for v in x])


def test_nearest_level_index_matches_best_index_int8_around_every_midpoint():
    points = []
    for low, high in zip(IQ4_LEVELS[:-1], IQ4_LEVELS[1:], strict=True):
        for anchor in (np.float32((low + high) / 2), np.float32(low), np.float32(high)):
            value = anchor
            for _ in range(4):  # a few ulps either side of each midpoint and level
                value = np.nextafter(value, np.float32(-np.inf))
            for _ in range(9):
                points.append(value)
                value = np.nextafter(value, np.float32(np.inf))
    rng = np.random.default_rng(0)
    points += list(rng.uniform(-300, 300, 2000).astype(np.float32))
    points += [np.float32(v) for v in (0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30, np.inf, -np.inf)]
    x = np.array(points, dtype=np.float32)
    ours = nearest_level_index(torch.from_numpy(x)).numpy()
    expected = np.array([reference_best_index_int8(v) for v in x])
    np.testing.assert_array_equal(ours, expected)
    np.testing.assert_array_equal(numba_best_index_int8(x), expected)


def test_nearest_level_index_of_nan_is_the_last_level_as_the_c_search():
    assert nearest_level_index(torch.tensor([float("nan")])).tolist() == [15]
    assert numba_best_index_int8(np.array([np.nan], dtype=np.float32)).tolist() == [15]


@pytest.mark.parametrize("type_name", IQ4_TYPES)
def test_iq4_registered_as_needing_an_imatrix(type_name):
    fmt = FORMATS[type_name]
    assert fmt.needs_imatrix
    block_size, bytes_per_block = (32, 18) if type_name == "IQ4_NL" else (256, 136)
    assert (fmt.block_size, fmt.bytes_per_block) == (block_size, bytes_per_block)


@pytest.mark.parametrize("type_name", IQ4_TYPES)
def test_iq4_bytes_match_ggml_on_heavy_tailed_weights(type_name):
    compare_with_ggml(heavy_tailed(128, 1536, seed=3), type_name).assert_matches()


@pytest.mark.parametrize("type_name", IQ4_TYPES)
def test_iq4_bytes_match_ggml_on_heavy_tailed_weights_with_imatrix(type_name):
    compare_with_ggml(heavy_tailed(128, 1536, seed=4), type_name, random_imatrix(1536, seed=5)).assert_matches()


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["no_imatrix", "imatrix"])
@pytest.mark.parametrize("type_name", IQ4_TYPES)
def test_iq4_bytes_match_ggml_on_smollm2_down_proj(type_name, with_imatrix, smollm2_down_proj):
    imatrix = random_imatrix(smollm2_down_proj.shape[1], seed=6) if with_imatrix else None
    compare_with_ggml(smollm2_down_proj, type_name, imatrix).assert_matches()


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["no_imatrix", "imatrix"])
def test_iq4_nl_bytes_match_ggml_on_576_wide_smollm2_weights(with_imatrix, smollm2_weights):
    weights = smollm2_weights["model.layers.29.mlp.gate_proj.weight"]  # [1536, 576]: not a multiple of 256
    imatrix = random_imatrix(weights.shape[1], seed=7) if with_imatrix else None
    compare_with_ggml(weights, "IQ4_NL", imatrix).assert_matches()


@pytest.mark.parametrize("type_name", IQ4_TYPES)
def test_iq4_dequantize_equals_gguf_dequantize(type_name):
    weights = heavy_tailed(64, 512, seed=8)
    data = ggml_quantize(weights, type_name, random_imatrix(512, seed=9))
    ours = dequantize(data, type_name, weights.shape)
    reference = gguf_quants.dequantize(data, GGMLQuantizationType[type_name]).reshape(weights.shape)
    np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize("type_name", IQ4_TYPES)
def test_iq4_quantize_accepts_torch_input_and_returns_the_same_bytes(type_name):
    weights = heavy_tailed(8, 512, seed=10)
    from_torch = quantize(torch.from_numpy(weights), type_name, imatrix=torch.from_numpy(random_imatrix(512)))
    from_numpy = quantize(weights, type_name, imatrix=random_imatrix(512))
    np.testing.assert_array_equal(from_torch, from_numpy)
