"""F32, F16, BF16: the bytes ggml writes for unquantized rows, and their exact round trip."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from llmquant.formats import FORMATS, dequantize, quantize
from llmquant.oracles.ggml import ggml_quantize
from tests.formats.compare import heavy_tailed

FLOAT_TYPES = ["F32", "F16", "BF16"]


def awkward_values() -> np.ndarray:
    """Values that test rounding: halfway cases for bf16 and fp16, subnormals, overflow, signed zeros."""
    halfway_bf16 = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x3F80FFFF, 0x7F7FFFFF], dtype=np.uint32)
    halfway_f16 = np.array([1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 65504.0, 65520.0, 2.0**-25, 2.0**-24 * 1.5])
    others = np.array([0.0, -0.0, 1e-40, -1e-42, 3.0e38, -7.5, 1e-8, 123456.789])
    values = np.concatenate([halfway_bf16.view(np.float32), halfway_f16.astype(np.float32), others.astype(np.float32)])
    rng = np.random.default_rng(5)
    random_bits = rng.integers(0, 0x7F800000, size=4101, dtype=np.uint32).view(np.float32)
    signs = np.where(rng.random(4101) < 0.5, -1, 1).astype(np.float32)
    return np.concatenate([values, random_bits * signs]).reshape(-1, 8).astype(np.float32)


@pytest.mark.parametrize("type_name", FLOAT_TYPES)
def test_float_bytes_match_ggml_on_random_weights(type_name: str):
    w = heavy_tailed(64, 512)
    assert np.array_equal(quantize(w, type_name), ggml_quantize(w, type_name))


@pytest.mark.parametrize("type_name", FLOAT_TYPES)
def test_float_bytes_match_ggml_on_rounding_edge_cases(type_name: str):
    w = awkward_values()
    assert np.array_equal(quantize(w, type_name), ggml_quantize(w, type_name))


@pytest.mark.parametrize("type_name", FLOAT_TYPES)
def test_float_bytes_match_ggml_on_real_weights(type_name: str, smollm2_weights):
    w = smollm2_weights["model.layers.0.self_attn.q_proj.weight"]
    assert np.array_equal(quantize(w, type_name), ggml_quantize(w, type_name))


@pytest.mark.parametrize("type_name", FLOAT_TYPES)
def test_whole_tensor_shortcut_equals_the_block_path(type_name: str):
    # quantize() converts finite weights in one pass (quantize_finite); quantize_blocks is the general path
    w = awkward_values()
    blocks = FORMATS[type_name].quantize_blocks(torch.from_numpy(w).reshape(-1, 1), None)
    assert np.array_equal(quantize(w, type_name), blocks.numpy().reshape(w.shape[0], -1))


def test_f32_of_float32_weights_is_a_read_only_view():
    w = heavy_tailed(16, 64)
    data = quantize(w, "F32")
    assert np.shares_memory(data, w) and not data.flags.writeable
    with pytest.raises(ValueError):
        data[0, 0] = 1
    with warnings.catch_warnings():  # reading it back raises no warning about its read-only memory
        warnings.simplefilter("error")
        assert np.array_equal(dequantize(data, "F32", w.shape), w)
    # any other input is converted first: the result is then its own memory
    w64 = w.astype(np.float64)
    assert not np.shares_memory(quantize(w64, "F32"), w64)
    assert np.array_equal(quantize(w64, "F32"), data)


@pytest.mark.parametrize("type_name", ["F16", "BF16"])
def test_nan_is_written_as_ggml_quiet_nan(type_name: str):
    # quantize() refuses non-finite weights, so the blocks are given directly
    nan_bits = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFA00123, 0x7FFFFFFF], dtype=np.uint32)
    values = nan_bits.view(np.float32).reshape(1, -1).copy()
    ours = FORMATS[type_name].quantize_blocks(torch.from_numpy(values).reshape(-1, 1), None)
    assert np.array_equal(ours.numpy().reshape(1, -1), ggml_quantize(values, type_name))


@pytest.mark.parametrize("type_name", FLOAT_TYPES)
def test_float_dequantize_equals_gguf_reference(type_name: str):
    w = awkward_values()
    data = quantize(w, type_name)
    reference = gguf_quants.dequantize(data, GGMLQuantizationType[type_name]).reshape(w.shape)
    assert np.array_equal(dequantize(data, type_name, w.shape), reference)
