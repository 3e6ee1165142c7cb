"""The 1-3-bit codebook i-quants (IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS, IQ2_XXS, IQ1_M, IQ1_S) against ggml's bytes,
gguf's dequantizer and gguf-py's copies of the grids.

Every block must be byte-identical: with an importance vector always, and without one where ggml allows it
(ggml_quantize_requires_imatrix); where it does not, ours refuses with a message saying how to give one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from llmquant.formats import FORMATS, dequantize, quantize
from llmquant.formats.iq_grids import GRID_TABLES, codeword_grid, sign_table
from llmquant.formats.iq_lowbit import CodebookFormat
from llmquant.oracles.ggml import ggml_quantize, ggml_requires_imatrix
from tests.formats.compare import compare_with_ggml, heavy_tailed, random_imatrix

LOW_BIT = ["IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"]
WITHOUT_IMATRIX = [name for name in LOW_BIT if not ggml_requires_imatrix(name)]
# gguf-py's class holding each grid (IQ1_M shares IQ1_S's)
GGUF_GRIDS = {"iq2xxs": "IQ2_XXS", "iq2xs": "IQ2_XS", "iq2s": "IQ2_S", "iq3xxs": "IQ3_XXS", "iq3s": "IQ3_S",
              "iq1s": "IQ1_S"}  # fmt: skip
SIZES = {"IQ3_S": 110, "IQ3_XXS": 98, "IQ2_S": 82, "IQ2_XS": 74, "IQ2_XXS": 66, "IQ1_M": 56, "IQ1_S": 50}


def _assert_identical(weights: np.ndarray, type_name: str, imatrix: np.ndarray | None) -> None:
    comparison = compare_with_ggml(weights, type_name, imatrix)
    comparison.assert_matches(min_identical=1.0, max_error_ratio=1.0)


def test_every_low_bit_format_is_registered_with_ggml_sizes():
    for name, size in SIZES.items():
        fmt = FORMATS[name]
        assert isinstance(fmt, CodebookFormat) and (fmt.block_size, fmt.bytes_per_block) == (256, size)
        assert fmt.needs_imatrix
        assert fmt.weights_per_level == fmt.grid.width == (4 if name.startswith("IQ3") else 8)
    assert all(fmt.weights_per_level == 1 for fmt in FORMATS.values() if not isinstance(fmt, CodebookFormat))


@pytest.mark.parametrize("name", sorted(GRID_TABLES))
def test_grid_data_equals_gguf_py_grids(name):
    cls = getattr(gguf_quants, GGUF_GRIDS[name])
    cls.init_grid()
    theirs = cls.grid.reshape(cls.grid_shape)
    ours = codeword_grid(name).values.astype(np.float32)
    np.testing.assert_array_equal(ours, theirs)


def test_sign_table_equals_gguf_py_ksigns():
    np.testing.assert_array_equal(sign_table(), np.frombuffer(gguf_quants.IQ2_XXS.ksigns, dtype=np.uint8))


@pytest.mark.parametrize("name", ["iq3xxs", "iq3s"])
def test_neighbour_lists_are_the_codewords_at_the_nearest_distances(name):
    """For every level pattern off the grid: ggml's neighbour list is every codeword at its first few distinct
    squared distances (2 for IQ3_XXS, 3 for IQ3_S), by distance then index. Checked by numpy on the IQ3 grids."""
    grid = codeword_grid(name)
    n_distances = 2 if name == "iq3xxs" else 3
    positions = grid.positions.astype(np.int64)
    patterns = np.arange(grid.index_map.shape[0])
    off_grid = patterns[grid.index_map < 0]
    assert len(off_grid) == len(patterns) - len(positions)
    for pattern in off_grid[::7]:
        point = 2 * ((pattern >> (3 * np.arange(4))) & 7) + 1
        distance = ((positions - point) ** 2).sum(axis=1)
        limit = np.unique(distance)[:n_distances].max()
        expected = np.lexsort((np.arange(len(distance)), distance))
        expected = expected[distance[expected] <= limit]
        start = -grid.index_map[pattern] - 1
        count = grid.neighbours[start]
        np.testing.assert_array_equal(grid.neighbours[start + 1:start + 1 + count], expected)


@pytest.mark.parametrize("type_name", LOW_BIT)
def test_bytes_match_ggml_on_heavy_tailed_weights_with_imatrix(type_name):
    _assert_identical(heavy_tailed(48, 1024, seed=3), type_name, random_imatrix(1024, seed=4))


@pytest.mark.parametrize("type_name", WITHOUT_IMATRIX)
def test_bytes_match_ggml_on_heavy_tailed_weights_without_imatrix(type_name):
    _assert_identical(heavy_tailed(48, 1024, seed=5), type_name, None)


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["no_imatrix", "imatrix"])
@pytest.mark.parametrize("type_name", LOW_BIT)
def test_bytes_match_ggml_on_smollm2_down_proj(type_name, with_imatrix, smollm2_weights):
    weights = smollm2_weights["model.layers.0.mlp.down_proj.weight"][:64]  # [64, 1536], real weights
    if not with_imatrix and ggml_requires_imatrix(type_name):
        with pytest.raises(ValueError, match=f"{type_name} needs an importance vector.*--imatrix FILE"):
            quantize(weights, type_name)
        return
    _assert_identical(weights, type_name, random_imatrix(1536, seed=6) if with_imatrix else None)


@pytest.mark.parametrize("type_name", LOW_BIT)
def test_dequantize_equals_gguf_dequantize(type_name):
    weights = heavy_tailed(16, 512, seed=8)
    data = ggml_quantize(weights, type_name, random_imatrix(512, seed=9))
    reference = gguf_quants.dequantize(data, GGMLQuantizationType[type_name]).reshape(weights.shape)
    np.testing.assert_array_equal(dequantize(data, type_name, weights.shape), reference)
    on_torch = dequantize(torch.from_numpy(data), type_name, weights.shape)
    np.testing.assert_array_equal(on_torch.numpy(), reference)


@pytest.mark.parametrize("type_name", LOW_BIT)
def test_chunks_of_rows_give_the_same_bytes(type_name):
    weights = heavy_tailed(9, 512, seed=10)
    imatrix = random_imatrix(512, seed=11)
    np.testing.assert_array_equal(quantize(weights, type_name, imatrix, chunk_rows=2),
                                  quantize(weights, type_name, imatrix))
