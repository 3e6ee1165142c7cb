"""llama.cpp's k-quants: 256-weight super-blocks of sub-blocks whose scales (and mins) are quantized too.

Q2_K, Q4_K, Q5_K: weight = (d·sc)·l - (dmin·m), per sub-block a scale sc and a min m stored as integers
(4-bit for Q2_K's 16 sub-blocks of 16, 6-bit for Q4_K's and Q5_K's 8 sub-blocks of 32) under one fp16 d and
one fp16 dmin per super-block. Q3_K, Q6_K: weight = (d·sc)·q, 16 sub-blocks of 16 with a 6-bit (Q3_K, stored
+32) or int8 (Q6_K) scale under one fp16 d.

Each search is ggml-quants.c's quantize_row_q*_K_ref (no importance: ggml's quantize_q*_K calls it when
quant_weights is NULL) or quantize_row_q*_K_impl (with importance), ported to numba operation for operation.
ggml then rounds every weight again under the stored (fp16) parameters, except in a sub-block whose stored
scale is 0, which keeps its search's levels; packing and unpacking are plain PyTorch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from llmquant.formats.base import BlockFormat, Grid, fp16_tensor
from llmquant.formats.legacy import fp16_bytes, fp16_from_bytes, level_values
from llmquant.formats.search import (
    GROUP_MAX_EPS,
    f32,
    fp16_bits,
    fp16_value,
    i64,
    kernel,
    make_q3_quants,
    make_qkx2_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    sequential_sum_of_squares,
)

QK_K = 256  # weights per super-block

# what ggml's "zero scale keeps the search's levels" means for the step contract
_KEEPS_SEARCH_LEVELS = "a sub-block whose stored scale is 0 keeps the levels of ggml's search"


class ScaleMinParams(NamedTuple):
    """Q2_K, Q4_K, Q5_K: ``super_scale`` d and ``super_min`` dmin (float16 ``[n_blocks]``), and per sub-block
    the quantized scale and min (uint8 ``[n_blocks, n_sub_blocks]``: 4-bit for Q2_K, 6-bit for Q4_K/Q5_K).
    Sub-block j is ``(d·sub_scales[j])·l - (dmin·sub_mins[j])``."""

    super_scale: torch.Tensor
    super_min: torch.Tensor
    sub_scales: torch.Tensor
    sub_mins: torch.Tensor


class SubScaleParams(NamedTuple):
    """Q3_K, Q6_K: ``super_scale`` d (float16 ``[n_blocks]``) and 16 sub-block scales ``[n_blocks, 16]`` as ggml
    stores them: Q3_K's 6-bit values 0..63 meaning value - 32 (uint8), Q6_K's int8. Sub-block j is
    ``(d·sc[j])·q``."""

    super_scale: torch.Tensor
    sub_scales: torch.Tensor


def _no_importance(blocks: np.ndarray) -> np.ndarray:
    """The 0-size stand-in the kernels get for a missing importance (they read it only with has_importance)."""
    return np.empty((0, blocks.shape[1]), dtype=np.float32)


def _per_weight(per_sub_block: torch.Tensor, sub_size: int) -> torch.Tensor:
    """float32 ``[n, n_sub]`` → each sub-block's value for each of its weights ``[n, n_sub·sub_size]``."""
    n, n_sub = per_sub_block.shape
    return per_sub_block[:, :, None].expand(n, n_sub, sub_size).reshape(n, n_sub * sub_size)


def _affine_grid(params: ScaleMinParams, sub_size: int, max_level: int) -> Grid:
    """gguf's Q2_K/Q4_K/Q5_K order: ``(d·sc)·q - (dmin·m)``, i.e. scale d·sc and offset -(dmin·m)."""
    d = params.super_scale.to(torch.float32)[:, None]
    dmin = params.super_min.to(torch.float32)[:, None]
    scale = d * params.sub_scales.to(torch.float32)
    offset = -(dmin * params.sub_mins.to(torch.float32))
    return Grid(_per_weight(scale, sub_size), _per_weight(offset, sub_size),
                level_values(0, max_level + 1, scale.device))


def _symmetric_grid(params: SubScaleParams, sub_scale_values: torch.Tensor, first_level: int) -> Grid:
    """gguf's Q3_K/Q6_K order: ``(d·sc)·q``."""
    scale = params.super_scale.to(torch.float32)[:, None] * sub_scale_values
    return Grid(_per_weight(scale, 16), None, level_values(first_level, -2 * first_level, scale.device))


# ---- packing: torch on 64-bit words ----
# The bit fields of the levels are merged into bytes (and split out of them) 8 bytes at a time, on the levels
# viewed as int64 words: each field is masked to its bits first, so no shift moves bits across a byte boundary
# and one word operation does the work of 8 byte operations. Byte by byte, on strided [n, 32] slices, Q3_K's
# packing took a fifth as long as its search; on words it takes half of that.

_BYTE_ONES = 0x0101010101010101  # 1 in every byte of a word


def _field_mask(width: int) -> int:
    """The low ``width`` bits of every byte of a word."""
    return _BYTE_ONES * ((1 << width) - 1)


def _words(data: torch.Tensor) -> torch.Tensor:
    """uint8 ``[n, 8·k]`` → the same bytes as int64 words ``[n, k]`` (copied only where they are not already laid
    out so)."""
    data = data.to(torch.uint8)
    # a view as words needs 8-byte aligned rows: a row slice of a block's bytes (one block, or none) may be
    # "contiguous" with the block's row stride and offset
    if not data.is_contiguous() or data.storage_offset() % 8 or data.stride(0) != data.shape[1]:
        data = torch.empty(data.shape, dtype=torch.uint8, device=data.device).copy_(data)
    return data.view(torch.int64)


def _bytes(words: torch.Tensor) -> torch.Tensor:
    """int64 words ``[n_blocks, ...]`` → their bytes, uint8 ``[n_blocks, 8·words per block]``."""
    return words.contiguous().view(torch.uint8).reshape(words.shape[0], 8 * math.prod(words.shape[1:]))


def _merge_fields(fields: torch.Tensor, width: int) -> torch.Tensor:
    """Fields ``[..., k, m]`` (k a power of 2, each byte's value below 2**width) → ``[..., m]`` with field i at
    bits ``i·width`` of each byte: the second half of the fields shifted past the first, then the halves of that,
    ... (contiguous halves: twice as fast as interleaved pairs)."""
    shift = width * fields.shape[-2] // 2
    while fields.shape[-2] > 1:
        half = fields.shape[-2] // 2
        fields = fields[..., :half, :] | (fields[..., half:, :] << shift)
        shift //= 2
    return fields[..., 0, :]


def _split_fields(words: torch.Tensor, n_fields: int, width: int) -> torch.Tensor:
    """The inverse of ``_merge_fields``: ``[..., m]`` → ``[..., n_fields, m]``."""
    mask = _field_mask(width)
    return torch.stack([(words >> (i * width)) & mask for i in range(n_fields)], dim=-2)


def _two_bit_quarters(words: torch.Tensor) -> torch.Tensor:
    """Levels 0..3 as words ``[n, 32]`` → Q2_K's/Q3_K's qs as words ``[n, 8]``: in each 128-weight half,
    byte l holds weights l, l+32, l+64, l+96 at bits 0, 2, 4, 6."""
    return _merge_fields(words.reshape(-1, 2, 4, 4), 2).reshape(-1, 8)


def _from_two_bit_quarters(qs: torch.Tensor) -> torch.Tensor:
    """qs bytes ``[n, 64]`` → levels 0..3 as words ``[n, 32]``."""
    return _split_fields(_words(qs).reshape(-1, 2, 4), 4, 2).reshape(-1, 32)


def _nibble_pairs(words: torch.Tensor) -> torch.Tensor:
    """Levels 0..15 as words ``[n, 32]`` → Q4_K's qs / Q5_K's ql as words ``[n, 16]``: each 64-weight chunk is
    32 bytes, low nibbles from its first 32 weights, high nibbles from the next 32."""
    return _merge_fields(words.reshape(-1, 4, 2, 4), 4).reshape(-1, 16)


def _from_nibble_pairs(qs: torch.Tensor) -> torch.Tensor:
    """qs bytes ``[n, 128]`` → levels 0..15 as words ``[n, 32]``."""
    return _split_fields(_words(qs).reshape(-1, 4, 4), 2, 4).reshape(-1, 32)


# ==== scale + min: Q2_K, Q4_K, Q5_K ====


def pack_k4_scales(sub_scales: torch.Tensor, sub_mins: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit sub-block scales and mins ``[n, 8]`` → the 12 bytes get_scale_min_k4 reads: bytes 0-3 scales
    0-3 (+ the top 2 bits of scales 4-7), 4-7 mins 0-3 (+ the top bits of mins 4-7), 8-11 the low nibbles of
    scales and mins 4-7."""
    sc = sub_scales.to(torch.uint8)
    m = sub_mins.to(torch.uint8)
    first = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    second = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    third = (sc[:, 4:] & 0xF) | (m[:, 4:] << 4)
    return torch.cat([first, second, third], dim=1)


def unpack_k4_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``pack_k4_scales``, as ggml's get_scale_min_k4: 12 bytes → scales, mins ``[n, 8]`` (uint8)."""
    q = packed.to(torch.uint8)
    scales = torch.cat([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], dim=1)
    mins = torch.cat([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], dim=1)
    return scales, mins


@kernel
def _requantize_affine(block, levels, sub_size, max_level, d_bits, dmin_bits, sub_scales, sub_mins):
    """The last loop of quantize_row_q2/q4/q5_K_ref and _impl: every weight rounded again under the stored fp16
    d, dmin and integer sub-block scale and min, ``nearest_int((x + dmin·m)/(d·sc))``; a sub-block whose scale
    d·sc is 0 keeps the levels of its search (ggml's ``if (!d) continue``)."""
    d = fp16_value(d_bits)
    dmin = fp16_value(dmin_bits)
    for j in range(sub_scales.shape[0]):
        sub_d = d * f32(sub_scales[j])
        if sub_d == 0:
            continue
        sub_m = dmin * f32(sub_mins[j])
        for i in range(sub_size * j, sub_size * (j + 1)):
            levels[i] = max(0, min(max_level, nearest_int((block[i] + sub_m) / sub_d)))


@kernel
def _q2_k_search(x, importance, has_importance, super_scale_bits, super_min_bits, sub_scales, sub_mins, levels):
    """quantize_row_q2_K_ref, or with importance quantize_row_q2_K_impl: per 16-weight sub-block a scale and a
    min by make_qkx2_quants (|x|-weighted absolute errors in ref; importance·sqrt(sigma2 + x²)-weighted squared
    errors in impl, as make_qkx3_quants), then both quantized to 4 bits: against the largest (ref) or by
    make_qp_quants weighted by each sub-block's total weight (impl)."""
    n_blocks = x.shape[0]
    weights = np.empty(x.shape, dtype=np.float32)
    sub_weight = np.empty((n_blocks, 16), dtype=np.float32)
    scales = np.empty((n_blocks, 16), dtype=np.float32)
    mins = np.empty((n_blocks, 16), dtype=np.float32)
    for b in range(n_blocks):
        block = x[b]
        if has_importance:
            sigma2 = sequential_sum_of_squares(block) / f32(QK_K)
            for j in range(16):
                sum_w = f32(0.0)
                for i in range(16):
                    v = block[16 * j + i]
                    weights[b, 16 * j + i] = importance[b, 16 * j + i] * np.sqrt(sigma2 + v * v)
                    sum_w += weights[b, 16 * j + i]
                sub_weight[b, j] = sum_w
        else:
            for i in range(QK_K):
                weights[b, i] = abs(block[i])
    if has_importance:
        make_qkx2_quants(x, weights, i64(16), levels, scales, mins, max_level=i64(3),
                         rmin=f32(-0.9), rdelta=f32(0.05), n_steps=i64(36), use_mad=np.bool_(False))
    else:
        make_qkx2_quants(x, weights, i64(16), levels, scales, mins, max_level=i64(3),
                         rmin=f32(-0.5), rdelta=f32(0.1), n_steps=i64(15), use_mad=np.bool_(True))
    scale_levels = np.empty(16, dtype=np.uint8)
    min_levels = np.empty(16, dtype=np.uint8)
    packed = np.empty(16, dtype=np.int64)  # y[i].scales: the scale nibble | the min nibble << 4
    for b in range(n_blocks):
        block = x[b]
        block_levels = levels[b]
        if has_importance:
            d_block = make_qp_quants(scales[b], sub_weight[b], scale_levels, max_level=i64(15))
            m_block = make_qp_quants(mins[b], sub_weight[b], min_levels, max_level=i64(15))
            super_scale_bits[b] = fp16_bits(d_block)
            super_min_bits[b] = fp16_bits(m_block)
            for j in range(16):
                packed[j] = (np.int64(scale_levels[j]) | (np.int64(min_levels[j]) << 4)) & 0xFF
        else:
            max_scale = f32(0.0)  # ggml: scales of a scale + min fit are never negative
            max_min = f32(0.0)
            for j in range(16):
                if scales[b, j] > max_scale:
                    max_scale = scales[b, j]
                if mins[b, j] > max_min:
                    max_min = mins[b, j]
            if max_scale > 0:
                iscale = f32(15.0) / max_scale
                for j in range(16):
                    packed[j] = nearest_int(iscale * scales[b, j]) & 0xFF  # uint8 y[i].scales[j] = l
                super_scale_bits[b] = fp16_bits(max_scale / f32(15.0))
            else:
                for j in range(16):
                    packed[j] = 0
                super_scale_bits[b] = fp16_bits(f32(0.0))
            if max_min > 0:
                iscale = f32(15.0) / max_min
                for j in range(16):
                    packed[j] = (packed[j] | (nearest_int(iscale * mins[b, j]) << 4)) & 0xFF
                super_min_bits[b] = fp16_bits(max_min / f32(15.0))
            else:
                super_min_bits[b] = fp16_bits(f32(0.0))
        for j in range(16):
            sub_scales[b, j] = packed[j] & 0xF
            sub_mins[b, j] = packed[j] >> 4
        _requantize_affine(block, block_levels, i64(16), i64(3), super_scale_bits[b], super_min_bits[b],
                           sub_scales[b], sub_mins[b])


@kernel
def _k4_search(x, importance, has_importance, max_level, rmin, rdelta, n_steps, clamp_importance_levels,
               super_scale_bits, super_min_bits, sub_scales, sub_mins, levels):
    """quantize_row_q4_K_ref / q5_K_ref, or with importance quantize_row_q4_K_impl / q5_K_impl (the two formats
    differ only in max_level and the ref search's steps): per 32-weight sub-block a scale and a min by
    make_qkx2_quants, weighted by rms(sub-block) + |x| (ref) or importance·sqrt(sigma2 + x²) (impl, as
    make_qkx3_quants with sigma2 twice the super-block's mean square), then both quantized to 6 bits: against
    the largest (ref) or by make_qp_quants weighted by each sub-block's total weight (impl; Q5_K's impl also
    clamps those to 63, a no-op for make_qp_quants' levels: ``clamp_importance_levels``)."""
    n_blocks = x.shape[0]
    weights = np.empty(x.shape, dtype=np.float32)
    sub_weight = np.empty((n_blocks, 8), dtype=np.float32)
    scales = np.empty((n_blocks, 8), dtype=np.float32)
    mins = np.empty((n_blocks, 8), dtype=np.float32)
    for b in range(n_blocks):
        block = x[b]
        if has_importance:
            sigma2 = f32(2.0) * sequential_sum_of_squares(block) / f32(QK_K)
            for j in range(8):
                sum_w = f32(0.0)
                for i in range(32):
                    v = block[32 * j + i]
                    weights[b, 32 * j + i] = importance[b, 32 * j + i] * np.sqrt(sigma2 + v * v)
                    sum_w += weights[b, 32 * j + i]
                sub_weight[b, j] = sum_w
        else:
            for j in range(8):
                av_x = np.sqrt(sequential_sum_of_squares(block[32 * j:32 * j + 32]) / f32(32.0))
                for i in range(32 * j, 32 * j + 32):
                    weights[b, i] = av_x + abs(block[i])
    if has_importance:
        make_qkx2_quants(x, weights, i64(32), levels, scales, mins, max_level=i64(max_level),
                         rmin=f32(-0.9), rdelta=f32(0.05), n_steps=i64(36), use_mad=np.bool_(False))
    else:
        make_qkx2_quants(x, weights, i64(32), levels, scales, mins, max_level=i64(max_level),
                         rmin=rmin, rdelta=rdelta, n_steps=i64(n_steps), use_mad=np.bool_(False))
    scale_levels = np.empty(8, dtype=np.uint8)
    min_levels = np.empty(8, dtype=np.uint8)
    for b in range(n_blocks):
        if has_importance:
            d_block = make_qp_quants(scales[b], sub_weight[b], scale_levels, max_level=i64(63))
            m_block = make_qp_quants(mins[b], sub_weight[b], min_levels, max_level=i64(63))
            for j in range(8):
                # Q4_K's impl stores them as they are: make_qp_quants caps them at 63 (or wraps a negative one,
                # which no scale + min fit gives); 6 bits are kept either way
                sub_scales[b, j] = min(63, scale_levels[j]) if clamp_importance_levels else scale_levels[j] & 63
                sub_mins[b, j] = min(63, min_levels[j]) if clamp_importance_levels else min_levels[j] & 63
            super_scale_bits[b] = fp16_bits(d_block)
            super_min_bits[b] = fp16_bits(m_block)
        else:
            max_scale = f32(0.0)  # ggml: scales of a scale + min fit are never negative
            max_min = f32(0.0)
            for j in range(8):
                if scales[b, j] > max_scale:
                    max_scale = scales[b, j]
                if mins[b, j] > max_min:
                    max_min = mins[b, j]
            inv_scale = f32(63.0) / max_scale if max_scale > 0 else f32(0.0)
            inv_min = f32(63.0) / max_min if max_min > 0 else f32(0.0)
            for j in range(8):
                # uint8 ls = nearest_int(...); MIN(63, ls)
                sub_scales[b, j] = min(63, nearest_int(inv_scale * scales[b, j]) & 0xFF)
                sub_mins[b, j] = min(63, nearest_int(inv_min * mins[b, j]) & 0xFF)
            super_scale_bits[b] = fp16_bits(max_scale / f32(63.0))
            super_min_bits[b] = fp16_bits(max_min / f32(63.0))
        _requantize_affine(x[b], levels[b], i64(32), i64(max_level), super_scale_bits[b], super_min_bits[b],
                           sub_scales[b], sub_mins[b])


class _ScaleMin(BlockFormat):
    """Q2_K / Q4_K / Q5_K: weight = (d·sc)·l - (dmin·m) per sub-block."""

    block_size = QK_K
    levels_from_search = _KEEPS_SEARCH_LEVELS
    Params = ScaleMinParams
    sub_size: int
    max_level: int

    def search(self, blocks, importance, row_sigma2):
        n_blocks = blocks.shape[0]
        n_sub = QK_K // self.sub_size
        super_scale_bits = np.empty(n_blocks, dtype=np.uint16)
        super_min_bits = np.empty(n_blocks, dtype=np.uint16)
        sub_scales = np.empty((n_blocks, n_sub), dtype=np.uint8)
        sub_mins = np.empty((n_blocks, n_sub), dtype=np.uint8)
        levels = np.empty(blocks.shape, dtype=np.uint8)
        has_importance = importance is not None
        self._run_search(blocks, importance if has_importance else _no_importance(blocks), has_importance,
                         super_scale_bits, super_min_bits, sub_scales, sub_mins, levels)
        return (fp16_tensor(super_scale_bits), fp16_tensor(super_min_bits), sub_scales, sub_mins), levels

    def reconstruct(self, params: ScaleMinParams) -> Grid:
        return _affine_grid(params, self.sub_size, self.max_level)


class Q2_K(_ScaleMin):
    """2-bit levels, 16 sub-blocks of 16 with 4-bit scales and mins under fp16 d and dmin (2.625 bits/weight).
    Block: 16 bytes of scale | min << 4, 64 bytes of 2-bit levels, d, dmin."""

    name = "Q2_K"
    bytes_per_block = 84
    sub_size = 16
    max_level = 3

    def _run_search(self, *args):
        _q2_k_search(*args)

    def pack(self, levels: torch.Tensor, params: ScaleMinParams) -> torch.Tensor:
        scale_bytes = params.sub_scales.to(torch.uint8) | (params.sub_mins.to(torch.uint8) << 4)
        qs = _bytes(_two_bit_quarters(_words(levels)))
        return torch.cat([scale_bytes, qs, fp16_bytes(params.super_scale), fp16_bytes(params.super_min)], dim=1)

    def unpack(self, data: torch.Tensor) -> tuple[torch.Tensor, ScaleMinParams]:
        scale_bytes = data[:, :16]
        params = ScaleMinParams(fp16_from_bytes(data[:, 80:82]), fp16_from_bytes(data[:, 82:84]),
                                scale_bytes & 0xF, scale_bytes >> 4)
        return _bytes(_from_two_bit_quarters(data[:, 16:80])), params


class _K4(_ScaleMin):
    """Q4_K / Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins in get_scale_min_k4's 12 bytes."""

    sub_size = 32
    ref_steps: tuple  # quantize_row_q*_K_ref's make_qkx2_quants (rmin, rdelta, n_steps)
    clamp_importance_levels: bool

    def _run_search(self, blocks, importance, has_importance, *outputs):
        rmin, rdelta, n_steps = self.ref_steps
        _k4_search(blocks, importance, has_importance, self.max_level, f32(rmin), f32(rdelta), n_steps,
                   self.clamp_importance_levels, *outputs)

    @staticmethod
    def _header(params: ScaleMinParams) -> torch.Tensor:
        return torch.cat([fp16_bytes(params.super_scale), fp16_bytes(params.super_min),
                          pack_k4_scales(params.sub_scales, params.sub_mins)], dim=1)

    @staticmethod
    def _params(data: torch.Tensor) -> ScaleMinParams:
        sub_scales, sub_mins = unpack_k4_scales(data[:, 4:16])
        return ScaleMinParams(fp16_from_bytes(data[:, 0:2]), fp16_from_bytes(data[:, 2:4]), sub_scales, sub_mins)


class Q4_K(_K4):
    """4-bit levels, 8 sub-blocks of 32 with 6-bit scales and mins (4.5 bits/weight).
    Block: d, dmin, 12 bytes of scales and mins, 128 bytes of nibbles."""

    name = "Q4_K"
    bytes_per_block = 144
    max_level = 15
    ref_steps = (-1.0, 0.1, 20)
    clamp_importance_levels = False

    def pack(self, levels: torch.Tensor, params: ScaleMinParams) -> torch.Tensor:
        return torch.cat([self._header(params), _bytes(_nibble_pairs(_words(levels)))], dim=1)

    def unpack(self, data: torch.Tensor) -> tuple[torch.Tensor, ScaleMinParams]:
        return _bytes(_from_nibble_pairs(data[:, 16:])), self._params(data)


class Q5_K(_K4):
    """5-bit levels (the fifth bit in qh), otherwise Q4_K's super-block (5.5 bits/weight).
    Block: d, dmin, 12 bytes of scales and mins, 32 bytes of fifth bits, 128 bytes of low nibbles."""

    name = "Q5_K"
    bytes_per_block = 176
    max_level = 31
    ref_steps = (-0.5, 0.1, 15)
    clamp_importance_levels = True

    def pack(self, levels: torch.Tensor, params: ScaleMinParams) -> torch.Tensor:
        levels = levels.to(torch.uint8)
        # 32-weight run r (chunk r//2, half r%2) puts weight j's fifth bit in bit r of qh[j]
        qh = _merge_fields(_words(levels >> 4).reshape(-1, 8, 4), 1)
        ql = _nibble_pairs(_words(levels & 0xF))
        return torch.cat([self._header(params), _bytes(qh), _bytes(ql)], dim=1)

    def unpack(self, data: torch.Tensor) -> tuple[torch.Tensor, ScaleMinParams]:
        fifth = _split_fields(_words(data[:, 16:48]), 8, 1).reshape(-1, 32)
        levels = _from_nibble_pairs(data[:, 48:]) | (fifth << 4)
        return _bytes(levels), self._params(data)


# ==== symmetric: Q3_K, Q6_K ====


@kernel
def _requantize_symmetric(block, levels, max_level, d_bits, sub_scale_values):
    """The last loop of quantize_row_q3/q6_K_ref and _impl: every weight rounded again under the stored fp16 d
    and integer sub-block scale, ``nearest_int(x/(d·sc))`` offset by max_level; a sub-block whose scale is 0
    keeps the levels of its search."""
    d = fp16_value(d_bits)
    for j in range(16):
        sub_d = d * f32(sub_scale_values[j])
        if sub_d == 0:
            continue
        for i in range(16 * j, 16 * j + 16):
            levels[i] = max_level + max(-max_level, min(max_level - 1, nearest_int(block[i] / sub_d)))


@kernel
def _q3_k_search(x, importance, has_importance, super_scale_bits, sub_scales, levels):
    """quantize_row_q3_K_ref: per 16-weight sub-block make_q3_quants, the scales then mapped to 6 bits against
    the one of largest magnitude (as -32); or with importance quantize_row_q3_K_impl: make_qx_quants weighted
    by importance·sqrt(sigma2 + x²), the 16 scales then quantized by make_qx_quants weighted by each sub-block's
    total weight. ``sub_scales`` are the stored values 0..63 (value - 32)."""
    weights = np.empty(16, dtype=np.float32)
    scales = np.empty(16, dtype=np.float32)
    sub_weight = np.empty(16, dtype=np.float32)
    block_levels = np.empty(QK_K, dtype=np.int8)  # ggml's int8_t L[QK_K]
    scale_levels = np.empty(16, dtype=np.int8)
    sub_scale_values = np.empty(16, dtype=np.int64)
    for b in range(x.shape[0]):
        block = x[b]
        if has_importance:
            sigma2 = f32(2.0) * sequential_sum_of_squares(block) / f32(QK_K)
            for j in range(16):
                sum_w = f32(0.0)
                for i in range(16):
                    v = block[16 * j + i]
                    weights[i] = importance[b, 16 * j + i] * np.sqrt(sigma2 + v * v)
                    sum_w += weights[i]
                sub_weight[j] = sum_w
                scales[j] = make_qx_quants(block[16 * j:16 * j + 16], weights, block_levels[16 * j:16 * j + 16],
                                           max_level=i64(4))
            d_block = make_qx_quants(scales, sub_weight, scale_levels, max_level=i64(32))
            for j in range(16):
                sub_scales[b, j] = scale_levels[j]
            super_scale_bits[b] = fp16_bits(d_block)
        else:
            amax = f32(0.0)
            max_scale = f32(0.0)
            for j in range(16):
                scales[j] = make_q3_quants(block[16 * j:16 * j + 16], block_levels[16 * j:16 * j + 16],
                                           max_level=i64(4))
                if abs(scales[j]) > amax:
                    amax = abs(scales[j])
                    max_scale = scales[j]
            if max_scale != 0:
                iscale = f32(-32.0) / max_scale
                for j in range(16):
                    level = ((nearest_int(iscale * scales[j]) + 128) & 0xFF) - 128  # int8_t l = nearest_int(...)
                    sub_scales[b, j] = max(-32, min(31, level)) + 32
                super_scale_bits[b] = fp16_bits(f32(1.0) / iscale)
            else:  # memset(y[i].scales, 0, 12)
                for j in range(16):
                    sub_scales[b, j] = 0
                super_scale_bits[b] = fp16_bits(f32(0.0))
        for j in range(16):
            sub_scale_values[j] = np.int64(sub_scales[b, j]) - 32
        _requantize_symmetric(block, block_levels, i64(4), super_scale_bits[b], sub_scale_values)
        for i in range(QK_K):
            levels[b, i] = block_levels[i]


@kernel
def _q6_k_search(x, importance, has_importance, super_scale_bits, sub_scales, levels):
    """quantize_row_q6_K_ref / _impl: per 16-weight sub-block make_qx_quants weighted by x² (ref) or by the
    importance itself (impl), then the 16 scales mapped to int8 against the one of largest magnitude (as -128).
    A super-block whose scales are all below GROUP_MAX_EPS is written as zeros (ggml's memset)."""
    weights = np.empty(16, dtype=np.float32)
    scales = np.empty(16, dtype=np.float32)
    block_levels = np.empty(QK_K, dtype=np.int8)  # ggml's int8_t L[QK_K]
    sub_scale_values = np.empty(16, dtype=np.int64)
    for b in range(x.shape[0]):
        block = x[b]
        max_scale = f32(0.0)
        max_abs_scale = f32(0.0)
        for j in range(16):
            for i in range(16):
                v = block[16 * j + i]
                weights[i] = importance[b, 16 * j + i] if has_importance else v * v
            scales[j] = make_qx_quants(block[16 * j:16 * j + 16], weights, block_levels[16 * j:16 * j + 16],
                                       max_level=i64(32))
            if abs(scales[j]) > max_abs_scale:
                max_abs_scale = abs(scales[j])
                max_scale = scales[j]
        if max_abs_scale < GROUP_MAX_EPS:
            super_scale_bits[b] = 0
            for j in range(16):
                sub_scales[b, j] = 0
            for i in range(QK_K):
                levels[b, i] = 0
            continue
        iscale = f32(-128.0) / max_scale
        super_scale_bits[b] = fp16_bits(f32(1.0) / iscale)
        for j in range(16):
            level = ((min(127, nearest_int(iscale * scales[j])) + 128) & 0xFF) - 128  # int8_t y[i].scales[j]
            sub_scales[b, j] = level
            sub_scale_values[j] = level
        _requantize_symmetric(block, block_levels, i64(32), super_scale_bits[b], sub_scale_values)
        for i in range(QK_K):
            levels[b, i] = block_levels[i]


class Q3_K(BlockFormat):
    """3-bit levels (2 low bits in qs, the high bit in hmask), 16 sub-blocks of 16 with 6-bit scales, one fp16
    d (3.4375 bits/weight). Block: hmask[32], qs[64], 12 bytes of scales, d. Level index = q + 4 (0..7)."""

    name = "Q3_K"
    block_size = QK_K
    bytes_per_block = 110
    levels_from_search = _KEEPS_SEARCH_LEVELS
    Params = SubScaleParams

    def search(self, blocks, importance, row_sigma2):
        n_blocks = blocks.shape[0]
        super_scale_bits = np.empty(n_blocks, dtype=np.uint16)
        sub_scales = np.empty((n_blocks, 16), dtype=np.uint8)
        levels = np.empty(blocks.shape, dtype=np.uint8)
        has_importance = importance is not None
        _q3_k_search(blocks, importance if has_importance else _no_importance(blocks), has_importance,
                     super_scale_bits, sub_scales, levels)
        return (fp16_tensor(super_scale_bits), sub_scales), levels

    def reconstruct(self, params: SubScaleParams) -> Grid:
        # gguf: (int8(sc) - 32) as float32, times d
        return _symmetric_grid(params, params.sub_scales.to(torch.float32) - 32, -4)

    def pack(self, levels: torch.Tensor, params: SubScaleParams) -> torch.Tensor:
        levels = levels.to(torch.uint8)
        # hmask byte m, bit b: the high bit of weight 32·b + m
        hmask = _merge_fields(_words(levels >> 2).reshape(-1, 8, 4), 1)
        qs = _two_bit_quarters(_words(levels & 3))
        # 6-bit scales: the low nibbles of j and j+8 share byte j; the top 2 bits of j go to byte 8 + j%4
        sc = params.sub_scales.to(torch.uint8)
        top = (sc >> 4).reshape(-1, 4, 4)
        scale_bytes = torch.cat([(sc[:, :8] & 0xF) | (sc[:, 8:] << 4),
                                 top[:, 0] | (top[:, 1] << 2) | (top[:, 2] << 4) | (top[:, 3] << 6)], dim=1)
        return torch.cat([_bytes(hmask), _bytes(qs), scale_bytes,
                          fp16_bytes(params.super_scale)], dim=1)

    def unpack(self, data: torch.Tensor) -> tuple[torch.Tensor, SubScaleParams]:
        high = _split_fields(_words(data[:, :32]), 8, 1).reshape(-1, 32)
        levels = _bytes(_from_two_bit_quarters(data[:, 32:96]) | (high << 2))
        scale_bytes = data[:, 96:108]
        low = torch.cat([scale_bytes[:, :8] & 0xF, scale_bytes[:, :8] >> 4], dim=1)
        top = scale_bytes[:, 8:12]
        top = torch.cat([top & 3, (top >> 2) & 3, (top >> 4) & 3, top >> 6], dim=1)
        return levels, SubScaleParams(fp16_from_bytes(data[:, 108:110]), low | (top << 4))


class Q6_K(BlockFormat):
    """6-bit levels (4 low bits in ql, 2 high bits in qh), 16 sub-blocks of 16 with int8 scales, one fp16 d
    (6.5625 bits/weight). Block: ql[128], qh[64], scales[16], d. Level index = q + 32 (0..63)."""

    name = "Q6_K"
    block_size = QK_K
    bytes_per_block = 210
    levels_from_search = _KEEPS_SEARCH_LEVELS + " (a super-block of scales all ~0 is written as zeros)"
    Params = SubScaleParams

    def search(self, blocks, importance, row_sigma2):
        n_blocks = blocks.shape[0]
        super_scale_bits = np.empty(n_blocks, dtype=np.uint16)
        sub_scales = np.empty((n_blocks, 16), dtype=np.int8)
        levels = np.empty(blocks.shape, dtype=np.uint8)
        has_importance = importance is not None
        _q6_k_search(blocks, importance if has_importance else _no_importance(blocks), has_importance,
                     super_scale_bits, sub_scales, levels)
        return (fp16_tensor(super_scale_bits), sub_scales), levels

    def reconstruct(self, params: SubScaleParams) -> Grid:
        return _symmetric_grid(params, params.sub_scales.to(torch.float32), -32)

    def pack(self, levels: torch.Tensor, params: SubScaleParams) -> torch.Tensor:
        # each 128-weight half: ql byte l holds weights l (low nibble) and l+64 (high), byte l+32 weights l+32
        # and l+96; qh byte l the top 2 bits of l, l+32, l+64, l+96
        levels = levels.to(torch.uint8)
        low = _words(levels & 0xF).reshape(-1, 2, 4, 4)  # [n, half, quarter, word]
        ql = low[:, :, 0:2] | (low[:, :, 2:4] << 4)
        qh = _merge_fields(_words(levels >> 4).reshape(-1, 2, 4, 4), 2)
        return torch.cat([_bytes(ql), _bytes(qh),
                          params.sub_scales.to(torch.int8).view(torch.uint8), fp16_bytes(params.super_scale)], dim=1)

    def unpack(self, data: torch.Tensor) -> tuple[torch.Tensor, SubScaleParams]:
        # low nibbles of both 32-byte runs of ql are quarters 0, 1; their high nibbles quarters 2, 3
        low = _split_fields(_words(data[:, :128]).reshape(-1, 2, 2, 4), 2, 4)  # [n, half, run, nibble, word]
        low = low.transpose(2, 3).reshape(-1, 2, 4, 4)
        high = _split_fields(_words(data[:, 128:192]).reshape(-1, 2, 4), 4, 2)
        levels = _bytes(low | (high << 4))
        sub_scales = data[:, 192:208].contiguous().view(torch.int8)
        return levels, SubScaleParams(fp16_from_bytes(data[:, 208:210]), sub_scales)
