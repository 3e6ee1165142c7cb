"""llama.cpp's legacy formats: 32-weight blocks with one fp16 scale (and an fp16 min for the _1 types).

Q8_0, Q4_0, Q5_0 (symmetric: weight = d·(l - mid)) and Q4_1, Q5_1 (weight = d·l + m), each with ggml's
reference path and, with an importance vector, its weighted search (quantize_row_q4_0_impl … q5_1_impl).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from llmquant.formats.base import BlockFormat, Grid, fp16_tensor
from llmquant.formats.search import (
    c_float_to_int,
    f32,
    first_largest_magnitude,
    fp16_bits,
    i64,
    kernel,
    make_qkx2_quants,
    make_qx_quants,
    round_half_away,
)

QK = 32  # weights per block
_INF = np.float32(np.inf)


class ScaleParams(NamedTuple):
    """One fp16 scale per block (float16 ``[n_blocks]``)."""

    scale: torch.Tensor


def fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """float16 ``[n]`` → ggml_half little-endian bytes ``[n, 2]``."""
    return values.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def fp16_from_bytes(data: torch.Tensor) -> torch.Tensor:
    """ggml_half bytes ``[n, 2]`` → float16 ``[n]``."""
    return data.contiguous().view(torch.float16).reshape(-1)


def per_weight(values: torch.Tensor, block_size: int) -> torch.Tensor:
    """One float32 value per block ``[n]`` → the same value for each of its weights ``[n, block_size]``."""
    return values.to(torch.float32)[:, None].expand(-1, block_size)


def level_values(first: int, count: int, device: torch.device) -> torch.Tensor:
    """A linear grid's level values: the consecutive integers ``first … first + count - 1`` as float32."""
    return torch.arange(first, first + count, dtype=torch.float32, device=device)


# ==== Q8_0 ====


@kernel
def _q8_0_search(x, scale_bits, levels):
    # quantize_row_q8_0_ref: d = amax/127, q = roundf(x/d) (the imatrix is ignored)
    for b in range(x.shape[0]):
        amax = f32(0.0)
        for j in range(QK):
            amax = max(amax, abs(x[b, j]))
        d = amax / f32(127.0)
        inverse = f32(1.0) / d if d != 0 else f32(0.0)
        scale_bits[b] = fp16_bits(d)
        if inverse < _INF:  # |x/d| <= 127: a plain conversion
            for j in range(QK):
                levels[b, j] = np.int32(round_half_away(x[b, j] * inverse)) + 128
        else:  # C's (int8_t) of roundf: a denormal d's infinite inverse wraps as x86 converts
            for j in range(QK):
                levels[b, j] = ((c_float_to_int(round_half_away(x[b, j] * inverse)) + 128) & 0xFF)


class Q8_0(BlockFormat):
    """8-bit levels and one fp16 scale per 32 weights: ggml's quantize_row_q8_0_ref (ggml ignores the imatrix)."""

    name = "Q8_0"
    block_size = QK
    bytes_per_block = 34
    levels_from_search = "ggml rounds x/d with d before its fp16 rounding"
    Params = ScaleParams

    def search(self, blocks, importance, row_sigma2):
        scale_bits = np.empty(blocks.shape[0], dtype=np.uint16)
        levels = np.empty(blocks.shape, dtype=np.uint8)
        _q8_0_search(blocks, scale_bits, levels)
        return (fp16_tensor(scale_bits),), levels

    def reconstruct(self, params: ScaleParams) -> Grid:
        scale = params.scale
        return Grid(per_weight(scale, QK), None, level_values(-128, 256, scale.device))

    def pack(self, levels: torch.Tensor, params: ScaleParams) -> torch.Tensor:
        return pack_blocks(levels, params, self.bytes_per_block, fifth_bits=False, level_bits=8)

    def unpack(self, data: torch.Tensor) -> tuple[torch.Tensor, ScaleParams]:
        return data[:, 2:] ^ 0x80, ScaleParams(fp16_from_bytes(data[:, :2]))


# ==== Q4_0, Q5_0: weight = d·(l - mid) ====


@kernel
def _symmetric_search(x, importance, has_importance, row_sigma2, mid, scale_bits, levels):
    """quantize_row_q4_0_ref / q5_0_ref, or with importance quantize_row_q4_0_impl / q5_0_impl (``mid`` 8 or 16).

    The reference path maps the first value of largest magnitude to -mid and truncates ``x/d + mid + 0.5``
    (C's ``(int8_t)``, capped at 2·mid - 1); its level bytes are kept as ggml stores them, which only a denormal
    scale pushes outside the grid. The importance path is make_qx_quants weighted by qw·sqrt(sigma2 + x²),
    sigma2 being the mean square of the block's row."""
    weights = np.empty(QK, dtype=np.float32)
    for b in range(x.shape[0]):
        block = x[b]
        if has_importance:
            for j in range(QK):
                weights[j] = importance[b, j] * np.sqrt(row_sigma2[b] + block[j] * block[j])
            scale_bits[b] = fp16_bits(make_qx_quants(block, weights, levels[b], max_level=i64(mid)))
            continue
        _, signed_max = first_largest_magnitude(block)
        d = signed_max / f32(-mid)
        inverse = f32(1.0) / d if d != 0 else f32(0.0)
        scale_bits[b] = fp16_bits(d)
        if inverse < _INF:  # x/d + mid + 0.5 lies in (0, 2·mid + 1): a plain conversion
            for j in range(QK):
                levels[b, j] = min(2 * mid - 1, np.int32(block[j] * inverse + f32(mid + 0.5)))
            continue
        for j in range(QK):
            level = c_float_to_int(block[j] * inverse + f32(mid + 0.5)) & 0xFF
            level = level - 256 if level >= 128 else level  # C's (int8_t), compared signed with the cap
            levels[b, j] = min(2 * mid - 1, level) & 0xFF


def from_nibbles(qs: torch.Tensor) -> torch.Tensor:
    return torch.cat([qs & 0xF, qs >> 4], dim=1)


@kernel
def _pack_legacy(fp16_params, levels, fifth_bits, level_bits, out):
    """ggml's block layout: the fp16 parameters' bytes (d, then m for the _1 types), then for 5-bit levels the
    32-bit qh (bit j = bit 4 of level j), then qs: the int8 levels (index ^ 0x80) for Q8_0, else 16 bytes with
    level j in the low nibble and level j+16 in the high one. Levels are bytes (C's uint8 casts), and the low
    nibble is ORed unmasked as ggml does for the 4-bit types, so a byte outside the grid passes through there."""
    n_params = fp16_params.shape[1]
    for b in range(levels.shape[0]):
        at = 0
        for p in range(n_params):
            out[b, at] = fp16_params[b, p] & 0xFF
            out[b, at + 1] = fp16_params[b, p] >> 8
            at += 2
        if level_bits == 8:
            for j in range(QK):
                out[b, at + j] = levels[b, j] ^ 0x80
            continue
        if fifth_bits:
            for k in range(4):
                byte = 0
                for j in range(8):
                    byte |= ((levels[b, 8 * k + j] >> 4) & 1) << j
                out[b, at + k] = byte
            at += 4
        low_mask = 0x0F if fifth_bits else 0xFF
        for j in range(QK // 2):
            out[b, at + j] = (levels[b, j] & low_mask) | ((levels[b, j + QK // 2] << 4) & 0xFF)


def pack_blocks(levels: torch.Tensor, params: NamedTuple, bytes_per_block: int, fifth_bits: bool,
                level_bits: int) -> torch.Tensor:
    """A legacy block's bytes from level indices ``[n, 32]`` and its fp16 parameters, on the levels' device (the
    packing runs on the CPU: one pass, as ggml writes the block)."""
    fp16_params = np.ascontiguousarray(np.stack(
        [p.detach().to("cpu", torch.float16).numpy().view(np.uint16) for p in params], axis=1))
    codes = np.ascontiguousarray(levels.detach().to("cpu", torch.uint8).numpy())
    out = np.empty((codes.shape[0], bytes_per_block), dtype=np.uint8)
    _pack_legacy(fp16_params, codes, fifth_bits, level_bits, out)
    return torch.from_numpy(out).to(levels.device)


def from_fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return (((qh[:, :, None] >> shifts) & 1) << 4).reshape(-1, 32)


class _Symmetric(BlockFormat):
    """Q4_0 / Q5_0: weight = d·(l - mid), one fp16 d per 32 weights."""

    block_size = QK
    mid: int
    uses_row_statistics = True
    needs_imatrix = False
    levels_from_search = "ggml rounds with d before its fp16 rounding"
    Params = ScaleParams

    def search(self, blocks, importance, row_sigma2):
        scale_bits = np.empty(blocks.shape[0], dtype=np.uint16)
        levels = np.empty(blocks.shape, dtype=np.uint8)
        has_importance = importance is not None
        _symmetric_search(blocks, importance if has_importance else blocks, has_importance,
                          row_sigma2 if has_importance else np.zeros(1, np.float32), self.mid, scale_bits, levels)
        return (fp16_tensor(scale_bits),), levels

    def reconstruct(self, params: ScaleParams) -> Grid:
        scale = params.scale
        return Grid(per_weight(scale, QK), None, level_values(-self.mid, 2 * self.mid, scale.device))


class Q4_0(_Symmetric):
    """4-bit levels around 8 and one fp16 scale per 32 weights."""

    name = "Q4_0"
    bytes_per_block = 18
    mid = 8

    def pack(self, levels: torch.Tensor, params: ScaleParams) -> torch.Tensor:
        return pack_blocks(levels, params, self.bytes_per_block, fifth_bits=False, level_bits=4)

    def unpack(self, data: torch.Tensor) -> tuple[torch.Tensor, ScaleParams]:
        return from_nibbles(data[:, 2:]), ScaleParams(fp16_from_bytes(data[:, :2]))


class Q5_0(_Symmetric):
    """5-bit levels around 16 (low nibbles in qs, fifth bits in a 32-bit qh) and one fp16 scale per 32 weights."""

    name = "Q5_0"
    bytes_per_block = 22
    mid = 16

    def pack(self, levels: torch.Tensor, params: ScaleParams) -> torch.Tensor:
        return pack_blocks(levels, params, self.bytes_per_block, fifth_bits=True, level_bits=4)

    def unpack(self, data: torch.Tensor) -> tuple[torch.Tensor, ScaleParams]:
        levels = from_nibbles(data[:, 6:]) | from_fifth_bits(data[:, 2:6])
        return levels, ScaleParams(fp16_from_bytes(data[:, :2]))


# ==== Q4_1, Q5_1: weight = d·l + m ====


class ScaleMinParams(NamedTuple):
    """One fp16 scale and one fp16 min per block (float16 ``[n_blocks]`` each)."""

    scale: torch.Tensor
    min: torch.Tensor


@kernel
def _affine_search(x, importance, has_importance, row_sigma2, max_level, capped, scale_bits, min_bits, levels):
    """quantize_row_q4_1_ref / q5_1_ref, or with importance quantize_row_q4_1_impl / q5_1_impl.

    The reference path takes min and max as ggml's loop keeps them (the first of a +0/-0 tie),
    d = (max - min)/max_level and truncates ``(x - min)/d + 0.5`` (Q4_1 caps at 15 as a signed int8, Q5_1
    converts straight to uint8). The importance path is make_qkx3_quants weighted by qw·sqrt(sigma2 + x²)."""
    if has_importance:
        weights = np.empty(x.shape, dtype=np.float32)
        for b in range(x.shape[0]):
            for j in range(QK):
                weights[b, j] = importance[b, j] * np.sqrt(row_sigma2[b] + x[b, j] * x[b, j])
        scales = np.empty((x.shape[0], 1), dtype=np.float32)
        mins = np.empty((x.shape[0], 1), dtype=np.float32)
        make_qkx2_quants(x, weights, i64(QK), levels, scales, mins, max_level=i64(max_level),
                         rmin=f32(-0.9), rdelta=f32(0.05), n_steps=i64(36), use_mad=np.bool_(False))
        for b in range(x.shape[0]):
            scale_bits[b] = fp16_bits(scales[b, 0])
            min_bits[b] = fp16_bits(-mins[b, 0])
        return
    for b in range(x.shape[0]):
        block = x[b]
        low = f32(np.inf)
        high = f32(-np.inf)
        for j in range(QK):
            if block[j] < low:
                low = block[j]
            if block[j] > high:
                high = block[j]
        d = (high - low) / f32(max_level)
        inverse = f32(1.0) / d if d != 0 else f32(0.0)
        scale_bits[b] = fp16_bits(d)
        min_bits[b] = fp16_bits(low)
        if inverse < _INF:  # (x - min)/d + 0.5 lies in [0.5, max_level + 1): a plain conversion
            for j in range(QK):
                levels[b, j] = min(max_level, np.int32((block[j] - low) * inverse + f32(0.5)))
            continue
        for j in range(QK):
            level = c_float_to_int((block[j] - low) * inverse + f32(0.5)) & 0xFF
            if capped:  # MIN(15, (int8_t)...) compares signed
                level = min(max_level, level - 256 if level >= 128 else level) & 0xFF
            levels[b, j] = level


class _Affine(BlockFormat):
    """Q4_1 / Q5_1: weight = d·l + m, an fp16 d and an fp16 m per 32 weights."""

    block_size = QK
    max_level: int
    uses_row_statistics = True
    levels_from_search = "ggml rounds with d and m before their fp16 rounding"
    Params = ScaleMinParams

    def search(self, blocks, importance, row_sigma2):
        n = blocks.shape[0]
        scale_bits = np.empty(n, dtype=np.uint16)
        min_bits = np.empty(n, dtype=np.uint16)
        levels = np.empty(blocks.shape, dtype=np.uint8)
        has_importance = importance is not None
        _affine_search(blocks, importance if has_importance else blocks, has_importance,
                       row_sigma2 if has_importance else np.zeros(1, np.float32), self.max_level,
                       self.max_level == 15, scale_bits, min_bits, levels)
        return (fp16_tensor(scale_bits), fp16_tensor(min_bits)), levels

    def reconstruct(self, params: ScaleMinParams) -> Grid:
        return Grid(per_weight(params.scale, QK), per_weight(params.min, QK),
                    level_values(0, self.max_level + 1, params.scale.device))


class Q4_1(_Affine):
    """4-bit levels, an fp16 scale and an fp16 min per 32 weights."""

    name = "Q4_1"
    bytes_per_block = 20
    max_level = 15

    def pack(self, levels: torch.Tensor, params: ScaleMinParams) -> torch.Tensor:
        return pack_blocks(levels, params, self.bytes_per_block, fifth_bits=False, level_bits=4)

    def unpack(self, data: torch.Tensor) -> tuple[torch.Tensor, ScaleMinParams]:
        return from_nibbles(data[:, 4:]), ScaleMinParams(fp16_from_bytes(data[:, :2]), fp16_from_bytes(data[:, 2:4]))


class Q5_1(_Affine):
    """5-bit levels (fifth bits in a 32-bit qh), an fp16 scale and an fp16 min per 32 weights."""

    name = "Q5_1"
    bytes_per_block = 24
    max_level = 31

    def pack(self, levels: torch.Tensor, params: ScaleMinParams) -> torch.Tensor:
        return pack_blocks(levels, params, self.bytes_per_block, fifth_bits=True, level_bits=4)

    def unpack(self, data: torch.Tensor) -> tuple[torch.Tensor, ScaleMinParams]:
        levels = from_nibbles(data[:, 8:]) | from_fifth_bits(data[:, 4:8])
        return levels, ScaleMinParams(fp16_from_bytes(data[:, :2]), fp16_from_bytes(data[:, 2:4]))
