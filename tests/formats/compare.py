"""Comparing our formats with ggml's bytes: shared by every format's tests and the benchmark.

The issue's bar: at least 99% of blocks byte-identical with ggml and an importance-weighted squared error
within 0.5% of ggml's, with and without an importance vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from llmquant.formats import FORMATS, quantize
from llmquant.oracles.ggml import ggml_quantize

# every registered format: a new one is compared with ggml as soon as its class exists
ALL_FORMATS = sorted(FORMATS)


@dataclass
class Comparison:
    type_name: str
    identical_blocks: float  # share of blocks whose bytes equal ggml's
    our_error: float  # importance-weighted squared error of our dequantized weights
    ggml_error: float

    @property
    def error_ratio(self) -> float:
        return self.our_error / self.ggml_error if self.ggml_error > 0 else (1.0 if self.our_error == 0 else np.inf)

    def assert_matches(self, min_identical: float = 0.99, max_error_ratio: float = 1.005) -> None:
        assert self.identical_blocks >= min_identical, self
        assert self.error_ratio <= max_error_ratio, self


def weighted_error(data: np.ndarray, type_name: str, weights: np.ndarray, imatrix: np.ndarray | None) -> float:
    back = gguf_quants.dequantize(data, GGMLQuantizationType[type_name]).reshape(weights.shape)
    sq = (back.astype(np.float64) - weights.astype(np.float64)) ** 2
    if imatrix is not None:
        sq = sq * imatrix.astype(np.float64)[None, :]
    return float(sq.sum())


def compare_with_ggml(weights: np.ndarray, type_name: str, imatrix: np.ndarray | None = None) -> Comparison:
    """Quantize with ours and with ggml; count identical blocks and compare weighted errors."""
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    ours = quantize(weights, type_name, imatrix=imatrix)
    theirs = ggml_quantize(weights, type_name, imatrix=imatrix)
    assert ours.shape == theirs.shape and ours.dtype == np.uint8
    fmt = FORMATS[type_name]
    ours_blocks = ours.reshape(-1, fmt.bytes_per_block)
    theirs_blocks = theirs.reshape(-1, fmt.bytes_per_block)
    identical = float((ours_blocks == theirs_blocks).all(axis=1).mean())
    return Comparison(
        type_name=type_name,
        identical_blocks=identical,
        our_error=weighted_error(ours, type_name, weights, imatrix),
        ggml_error=weighted_error(theirs, type_name, weights, imatrix),
    )


def heavy_tailed(rows: int, cols: int, seed: int = 0, scale: float = 0.02) -> np.ndarray:
    """Random weights with heavy tails (Student-t, 3 degrees of freedom), like real LLM weights."""
    rng = np.random.default_rng(seed)
    return (rng.standard_t(df=3, size=(rows, cols)) * scale).astype(np.float32)


def random_imatrix(cols: int, seed: int = 1) -> np.ndarray:
    """A plausible importance vector: positive, spread over orders of magnitude, a few dominant columns."""
    rng = np.random.default_rng(seed)
    return (rng.lognormal(mean=0.0, sigma=1.5, size=cols) ** 2).astype(np.float32)
