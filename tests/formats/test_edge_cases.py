"""Every format against ggml's bytes on inputs that stress the searches' corner cases.

Deterministic inputs (all-zero blocks, one huge outlier, constant rows, denormals, values at the top of the
F16 range, tiny values), each with no imatrix, a random one, and one holding zeros: "behave as ggml does"
means every block byte-identical, including where ggml writes inf or NaN. A format of the intended list that
is not registered yet fails here rather than being skipped.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from llmquant.formats import FORMATS, dequantize, quantize
from llmquant.oracles.ggml import ggml_quantize, ggml_requires_imatrix
from tests.formats.compare import ALL_FORMATS, heavy_tailed, random_imatrix

ROWS, COLUMNS = 8, 512  # 512 columns: two 256-weight super-blocks, sixteen 32-weight blocks per row
F16_MAX = 65504.0

# the relative RMS error a round trip may leave on Gaussian weights: a bound from each format's bits per weight
ROUND_TRIP_TOLERANCE = {
    "F32": 0.0, "F16": 5e-4, "BF16": 4e-3,
    "Q8_0": 0.01, "Q4_0": 0.12, "Q4_1": 0.11, "Q5_0": 0.06, "Q5_1": 0.055,
    "Q2_K": 0.4, "Q3_K": 0.22, "Q4_K": 0.1, "Q5_K": 0.05, "Q6_K": 0.025,
    "IQ4_NL": 0.1, "IQ4_XS": 0.1,
    "IQ3_S": 0.2, "IQ3_XXS": 0.26, "IQ2_S": 0.3, "IQ2_XS": 0.36, "IQ2_XXS": 0.4, "IQ1_M": 0.65, "IQ1_S": 0.55,
}  # fmt: skip


def registered(type_name: str):
    assert type_name in FORMATS, (
        f"{type_name} is not registered in llmquant.formats (registered: {', '.join(sorted(FORMATS))})"
    )
    return FORMATS[type_name]


def _zero_blocks() -> np.ndarray:
    """Whole zero rows, zero 32- and 256-weight blocks inside non-zero rows, and negative zeros."""
    x = heavy_tailed(ROWS, COLUMNS, seed=20)
    x[0] = 0.0
    x[1] = -0.0
    x[2:, :32] = 0.0
    x[3:, 256:] = 0.0
    x[4, 64:96] = -0.0
    return x


def _single_outlier() -> np.ndarray:
    """Small weights with one outlier 10^4 times their scale per row, at a different position in each row."""
    x = heavy_tailed(ROWS, COLUMNS, seed=21, scale=0.01)
    positions = [0, 31, 32, 100, 255, 256, 300, 511]
    for row, position in enumerate(positions):
        x[row, position] = 100.0 if row % 2 == 0 else -100.0
    x[ROWS - 1, :] = 0.0  # an outlier alone in an otherwise zero row
    x[ROWS - 1, 77] = 250.0
    return x


def _constant_rows() -> np.ndarray:
    """Each row one value: positive, negative, tiny, large, on and between grid points."""
    values = [0.25, -1.5, 3.0e-3, -7.0, 1.0, 0.1, -1e-4, 1000.0]
    return np.repeat(np.array(values, dtype=np.float32)[:, None], COLUMNS, axis=1)


def _denormals() -> np.ndarray:
    """float32 denormals alone, and mixed in blocks with ordinary small weights."""
    rng = np.random.default_rng(22)
    x = (rng.standard_normal((ROWS, COLUMNS)) * 1e-39).astype(np.float32)
    x[ROWS // 2:, ::2] = heavy_tailed(ROWS // 2, COLUMNS // 2, seed=23)
    x[0, :8] = np.float32(1e-45)  # the smallest denormal
    return x


def _near_f16_max() -> np.ndarray:
    """Weights spread up to ±65504·0.9 (no scale overflows F16), and blocks with ±65504 itself."""
    x = heavy_tailed(ROWS, COLUMNS, seed=24)
    x = (x / np.abs(x).max(axis=1, keepdims=True) * (0.9 * F16_MAX)).astype(np.float32)
    x[ROWS // 2:, ::37] = F16_MAX
    x[ROWS // 2:, 5::41] = -F16_MAX
    x[ROWS - 1, :] = F16_MAX
    x[ROWS - 2, :] = np.where(np.arange(COLUMNS) % 2 == 0, F16_MAX, -F16_MAX)
    return x


def _beyond_f16_max() -> np.ndarray:
    """Weights up to ~1e7, so that the fp16 scales (and F16 itself) overflow to inf in ggml."""
    x = heavy_tailed(ROWS, COLUMNS, seed=25)
    return (x / np.abs(x).max(axis=1, keepdims=True) * 1e7).astype(np.float32)


def _tiny_values() -> np.ndarray:
    """Rows at 1e-6, 1e-10, 1e-14, 1e-16, 1e-20 and 1e-30: around the searches' epsilons and x² underflow."""
    scales = [1e-6, 1e-10, 1e-14, 1e-15, 1e-16, 1e-20, 1e-30, 1e-35]
    x = heavy_tailed(ROWS, COLUMNS, seed=26)
    x = x / np.abs(x).max(axis=1, keepdims=True)
    return (x * np.array(scales)[:, None]).astype(np.float32)


EDGE_CASES: dict[str, Callable[[], np.ndarray]] = {
    "zero_blocks": _zero_blocks,
    "single_outlier": _single_outlier,
    "constant_rows": _constant_rows,
    "denormals": _denormals,
    "near_f16_max": _near_f16_max,
    "beyond_f16_max": _beyond_f16_max,
    "tiny_values": _tiny_values,
}


def _imatrix(kind: str) -> np.ndarray | None:
    if kind == "none":
        return None
    imatrix = random_imatrix(COLUMNS, seed=27)
    if kind == "with_zeros":
        imatrix[::5] = 0.0  # scattered zero importances
        imatrix[256:] = 0.0  # a whole super-block (and its blocks) of zero importance
    return imatrix


def _first_mismatches(ours: np.ndarray, theirs: np.ndarray, bytes_per_block: int, limit: int = 3) -> str:
    ours_blocks, theirs_blocks = ours.reshape(-1, bytes_per_block), theirs.reshape(-1, bytes_per_block)
    bad = np.nonzero((ours_blocks != theirs_blocks).any(axis=1))[0]
    lines = [f"{len(bad)} of {len(ours_blocks)} blocks differ"]
    for block in bad[:limit]:
        lines.append(f"block {block}: ours {ours_blocks[block].tolist()}")
        lines.append(f"{'':>{len(str(block)) + 7}}ggml {theirs_blocks[block].tolist()}")
    return "\n".join(lines)


@pytest.mark.parametrize("imatrix_kind", ["none", "random", "with_zeros"])
@pytest.mark.parametrize("case", sorted(EDGE_CASES))
@pytest.mark.parametrize("type_name", ALL_FORMATS)
def test_bytes_match_ggml_on_edge_case(type_name: str, case: str, imatrix_kind: str):
    fmt = registered(type_name)
    weights = EDGE_CASES[case]()
    imatrix = _imatrix(imatrix_kind)
    if imatrix is None and ggml_requires_imatrix(type_name):  # ggml aborts; we refuse, saying how to give one
        with pytest.raises(ValueError, match=f"{type_name} needs an importance vector.*--imatrix FILE"):
            quantize(weights, type_name)
        return
    ours = quantize(weights, type_name, imatrix=imatrix)
    theirs = ggml_quantize(weights, type_name, imatrix=imatrix)
    assert ours.shape == theirs.shape and ours.dtype == np.uint8
    assert np.array_equal(ours, theirs), _first_mismatches(ours, theirs, fmt.bytes_per_block)


@pytest.mark.parametrize("type_name", ALL_FORMATS)
def test_round_trip_is_close_to_the_weights(type_name: str):
    registered(type_name)
    weights = np.random.default_rng(28).standard_normal((ROWS, COLUMNS)).astype(np.float32)
    # the formats that need an importance vector get a uniform one
    imatrix = np.ones(COLUMNS, dtype=np.float32) if ggml_requires_imatrix(type_name) else None
    back = dequantize(quantize(weights, type_name, imatrix=imatrix), type_name, weights.shape)
    assert back.shape == weights.shape and back.dtype == np.float32
    relative_rms = float(np.sqrt(((back - weights) ** 2).sum() / (weights**2).sum()))
    assert relative_rms <= ROUND_TRIP_TOLERANCE[type_name], (type_name, relative_rms)


@pytest.mark.parametrize("type_name", ALL_FORMATS)
def test_round_trip_of_zeros_is_zeros(type_name: str):
    registered(type_name)
    weights = np.zeros((2, COLUMNS), dtype=np.float32)
    back = dequantize(quantize(weights, type_name, imatrix=_imatrix("with_zeros")), type_name, weights.shape)
    np.testing.assert_array_equal(back, weights)


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
@pytest.mark.parametrize("type_name", [name for name in ALL_FORMATS if hasattr(FORMATS[name], "Params")])
def test_unpack_and_pack_keep_ggml_bytes_on_edge_case(type_name: str, case: str):
    fmt = registered(type_name)
    theirs = ggml_quantize(EDGE_CASES[case](), type_name, imatrix=_imatrix("with_zeros"))
    blocks = torch.from_numpy(theirs.reshape(-1, fmt.bytes_per_block))
    levels, params = fmt.unpack(blocks)
    assert np.array_equal(fmt.pack(levels, params).numpy(), blocks.numpy())
    back = fmt.reconstruct(params).weights(levels).numpy().reshape(-1)
    n_weights = theirs.size // fmt.bytes_per_block * fmt.block_size
    np.testing.assert_array_equal(back, dequantize(theirs, type_name, (n_weights,)))
