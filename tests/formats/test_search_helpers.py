"""formats.search's numeric helpers against independent references (numpy's IEEE half conversion, C semantics)."""

from __future__ import annotations

import numpy as np

from llmquant.formats.search import fp16_bits, fp16_round, fp16_value, kernel


@kernel
def _to_half_bits(x, out):
    for i in range(x.shape[0]):
        out[i] = fp16_bits(x[i])


@kernel
def _round_trip(x, rounded, values, bits):
    for i in range(x.shape[0]):
        rounded[i] = fp16_round(x[i])
    for i in range(bits.shape[0]):
        values[i] = fp16_value(bits[i])


def _every_exponent() -> np.ndarray:
    """Finite float32s spread over every exponent and mantissa pattern, the half boundaries and ties among them."""
    spread = np.arange(0, 2**32, 1009, dtype=np.uint64).astype(np.uint32).view(np.float32)
    edges = np.array([65504, 65519.996, 65520, -65520, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0000001, 2.0**-14,
                      2.0**-14 * (1 - 2.0**-11), 1 + 2.0**-11, 1 + 3 * 2.0**-11, 0.0, -0.0], dtype=np.float32)
    return np.concatenate([spread[np.isfinite(spread)], edges, np.float32([np.inf, -np.inf])])


def test_fp16_bits_is_ieee_round_to_nearest_even():
    x = _every_exponent()
    ours = np.empty(x.shape, np.int32)
    _to_half_bits(x, ours)
    with np.errstate(over="ignore"):
        assert np.array_equal(ours.astype(np.uint16), x.astype(np.float16).view(np.uint16))


def test_fp16_bits_of_nan_is_ggmls_quiet_nan_with_its_sign():
    payloads = np.array([0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0xFFC00000, 0xFF812345], dtype=np.uint32)
    ours = np.empty(payloads.shape, np.int32)
    _to_half_bits(payloads.view(np.float32), ours)
    assert ours.tolist() == [0x7E00, 0x7E00, 0x7E00, 0xFE00, 0xFE00]


def test_fp16_value_and_round_trip_match_numpy():
    x = _every_exponent()
    bits = np.arange(0x10000, dtype=np.int32)
    rounded, values = np.empty_like(x), np.empty(bits.shape, np.float32)
    _round_trip(x, rounded, values, bits)
    with np.errstate(over="ignore"):
        assert np.array_equal(rounded, x.astype(np.float16).astype(np.float32))
    expected = bits.astype(np.uint16).view(np.float16).astype(np.float32)
    finite = np.isfinite(expected)
    assert np.array_equal(values[finite], expected[finite])
    assert np.array_equal(np.isnan(values), np.isnan(expected))
