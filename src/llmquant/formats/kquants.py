"""llama.cpp's k-quants: 256-weight super-blocks of sub-blocks with quantized scales (and mins).

Q3_K and Q6_K (symmetric sub-blocks), Q2_K, Q4_K and Q5_K (scale + min sub-blocks), each with ggml's
reference path and, with an importance vector, its weighted search.
"""

from __future__ import annotations

import torch

from llmquant.formats import compiled, search
from llmquant.formats.base import BlockFormat

# ==== symmetric: Q3_K, Q6_K ====


def _sym_fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """float32 ``[n]`` → ggml_half bytes ``[n, 2]`` (little-endian; torch rounds to nearest even like ggml)."""
    return values.to(torch.float16).view(torch.uint8).reshape(-1, 2)


def _sym_fp16_values(data: torch.Tensor) -> torch.Tensor:
    """ggml_half bytes ``[n, 2]`` → float32 ``[n]``."""
    return data.contiguous().view(torch.float16).to(torch.float32).reshape(-1)


def _sym_requantize(
    x: torch.Tensor, levels: torch.Tensor, sub_block_scales: torch.Tensor, nmax: int
) -> torch.Tensor:
    """Round each sub-block again with its final (quantized) scale, as the last loop of ggml's
    quantize_row_q3_K_ref / q6_K_ref: ``nearest_int(x / d)``; a sub-block whose scale is 0 keeps its levels.

    x, levels: ``[n_sub_blocks, 16]``; sub_block_scales: ``[n_sub_blocks]``."""
    has_scale = sub_block_scales != 0
    divisor = torch.where(has_scale, sub_block_scales, torch.ones_like(sub_block_scales))
    requantized = search.nearest_int(x / divisor[:, None]).clamp_(-nmax, nmax - 1) + nmax
    return torch.where(has_scale[:, None], requantized, levels)


def _sym_split_quarters(levels: torch.Tensor) -> torch.Tensor:
    # [n, 256] → [n, 2, 4, 32]: ggml packs each 128-weight half as four runs of 32 sharing bytes
    return levels.reshape(-1, 2, 4, 32)


class Q6_K(BlockFormat):
    """6-bit levels, 16 sub-blocks of 16 with int8 scales, one fp16 super-block scale (6.5625 bits/weight)."""

    name = "Q6_K"
    block_size = 256
    bytes_per_block = 210
    chunk_weights = 1 << 18  # the search's temporaries stay near the cache

    def quantize_blocks(self, blocks: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        n_blocks = blocks.shape[0]
        x = blocks.reshape(-1, 16)
        # ggml's quantize_row_q6_K_ref / _impl: per sub-block make_qx_quants (weights x², or the imatrix as is)
        sub_weights = None if importance is None else importance.reshape(-1, 16)
        scales, levels = search.make_qx_quants(x, 32, rmse_type=1, weights=sub_weights)
        scales = scales.reshape(n_blocks, 16)
        max_scale = search.signed_absmax(scales)
        empty = max_scale.abs() < search.GROUP_MAX_EPS
        safe_max = torch.where(empty, torch.ones_like(max_scale), max_scale)
        inverse_scale = search.divide_scalar_by(-128.0, safe_max)
        super_scale = _sym_fp16_bytes(search.divide_scalar_by(1.0, inverse_scale))
        sub_scales = search.nearest_int(inverse_scale[:, None] * scales).clamp_(max=127)
        d = _sym_fp16_values(super_scale)
        sub_block_scales = (d[:, None] * sub_scales.to(torch.float32)).reshape(-1)
        levels = _sym_requantize(x, levels, sub_block_scales, 32)

        q = _sym_split_quarters(levels)
        low = q & 0xF
        ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=2)
        high = q >> 4
        qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
        packed = torch.cat(
            [
                ql.reshape(n_blocks, 128).to(torch.uint8),
                qh.reshape(n_blocks, 64).to(torch.uint8),
                sub_scales.to(torch.int8).view(torch.uint8),
                super_scale,
            ],
            dim=1,
        )
        # a super-block whose sub-block scales are all ~0 is written as zeros (ggml's memset)
        return torch.where(empty[:, None], torch.zeros_like(packed), packed)

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        ql = data[:, :128].to(torch.int32).reshape(-1, 2, 64)
        qh = data[:, 128:192].to(torch.int32).reshape(-1, 2, 32)
        sub_scales = data[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
        d = _sym_fp16_values(data[:, 208:210])
        low = torch.stack([ql[:, :, :32] & 0xF, ql[:, :, 32:] & 0xF, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], dim=2)
        shifts = torch.arange(0, 8, 2, device=data.device, dtype=torch.int32).reshape(1, 1, 4, 1)
        high = (qh[:, :, None, :] >> shifts) & 3
        q = ((low | (high << 4)) - 32).reshape(-1, 16, 16).to(torch.float32)
        # (d · scale) · q, in ggml's order
        return ((d[:, None] * sub_scales)[:, :, None] * q).reshape(-1, 256)


class Q3_K(BlockFormat):
    """3-bit levels (2 low bits in qs, the high bit in hmask), 16 sub-blocks of 16 with 6-bit scales,
    one fp16 super-block scale (3.4375 bits/weight)."""

    name = "Q3_K"
    block_size = 256
    bytes_per_block = 110
    chunk_weights = 1 << 19  # make_q3_quants runs value by value: wider calls share their overhead

    def quantize_blocks(self, blocks: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        n_blocks = blocks.shape[0]
        x = blocks.reshape(-1, 16)
        if importance is None:
            scales, levels = search.make_q3_quants(x, 4, do_rmse=True)
            if compiled.enabled(blocks):
                fused = compiled.run(_q3_k_reference_finish_kernel, (), blocks.contiguous(),
                                     scales.reshape(n_blocks, 16), levels.reshape(n_blocks, 256))
                if fused is not None:
                    hmask, qs, packed_scales, d_half = fused
                    return torch.cat([hmask, qs, packed_scales, d_half.view(torch.uint8).reshape(n_blocks, 2)], dim=1)
            super_scale, sub_scales = self._reference_scales(scales, n_blocks)
        else:
            super_scale, sub_scales, levels = self._weighted_scales(blocks, x, importance)
        # sub-block scales are stored with an offset of 32; the final rounding uses them as stored
        d = _sym_fp16_values(super_scale)
        sub_block_scales = (d[:, None] * (sub_scales - 32).to(torch.float32)).reshape(-1)
        levels = _sym_requantize(x, levels, sub_block_scales, 4).reshape(n_blocks, 256)

        # hmask byte m, bit b: the high bit of value 32·b + m (ggml stores L - 4 in the low bits then)
        high = (levels >> 2).reshape(n_blocks, 8, 32)
        bits = torch.arange(8, device=blocks.device, dtype=torch.int32).reshape(1, 8, 1)
        hmask = (high << bits).sum(dim=1)
        q = _sym_split_quarters(levels & 3)
        qs = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
        # 6-bit scales: low nibbles of j and j+8 share byte j; the top two bits of j go to byte 8 + j%4
        scale_low = sub_scales & 0xF
        scale_high = (sub_scales >> 4).reshape(n_blocks, 4, 4)
        shifts = torch.arange(0, 8, 2, device=blocks.device, dtype=torch.int32).reshape(1, 4, 1)
        packed_scales = torch.cat(
            [scale_low[:, :8] | (scale_low[:, 8:] << 4), (scale_high << shifts).sum(dim=1)], dim=1
        )
        return torch.cat(
            [
                hmask.to(torch.uint8),
                qs.reshape(n_blocks, 64).to(torch.uint8),
                packed_scales.to(torch.uint8),
                super_scale,
            ],
            dim=1,
        )

    @staticmethod
    def _reference_scales(scales: torch.Tensor, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ggml's quantize_row_q3_K_ref after make_q3_quants: the sub-block scales rounded against the one of
        largest magnitude mapped to -32. Returns d (fp16 bytes) and the stored 6-bit scales."""
        scales = scales.reshape(n_blocks, 16)
        max_scale = search.signed_absmax(scales)
        nonzero = max_scale != 0
        safe_max = torch.where(nonzero, max_scale, torch.ones_like(max_scale))
        inverse_scale = search.divide_scalar_by(-32.0, safe_max)
        sub_scales = search.nearest_int(inverse_scale[:, None] * scales).clamp_(-32, 31) + 32
        # with every scale zero ggml leaves the scale bytes zero and writes d = 0
        sub_scales = torch.where(nonzero[:, None], sub_scales, torch.zeros_like(sub_scales))
        d = torch.where(nonzero, search.divide_scalar_by(1.0, inverse_scale), torch.zeros_like(max_scale))
        return _sym_fp16_bytes(d), sub_scales

    @staticmethod
    def _weighted_scales(
        blocks: torch.Tensor, x: torch.Tensor, importance: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ggml's quantize_row_q3_K_impl: make_qx_quants per sub-block weighted by
        ``importance·sqrt(sigma2 + x²)`` (sigma2 = twice the super-block's mean square), then the 16
        sub-block scales themselves quantized to 6 bits by make_qx_quants weighted by each sub-block's
        total weight."""
        n_blocks = blocks.shape[0]
        sum_x2 = search.sequential_sum(blocks * blocks)
        sigma2 = (2.0 * sum_x2) / torch.full_like(sum_x2, 256.0)
        sigma2 = sigma2.repeat_interleave(16)
        weights = importance.reshape(-1, 16) * search.sqrt_f32(sigma2[:, None] + x * x)
        sub_block_weight = search.sequential_sum(weights).reshape(n_blocks, 16)
        scales, levels = search.make_qx_quants(x, 4, rmse_type=1, weights=weights)
        d_block, sub_scales = search.make_qx_quants(
            scales.reshape(n_blocks, 16), 32, rmse_type=1, weights=sub_block_weight
        )
        return _sym_fp16_bytes(d_block), sub_scales, levels

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        hmask = data[:, :32].to(torch.int32)
        qs = data[:, 32:96].to(torch.int32).reshape(-1, 2, 1, 32)
        packed_scales = data[:, 96:108].to(torch.int32)
        d = _sym_fp16_values(data[:, 108:110])
        shifts = torch.arange(0, 8, 2, device=data.device, dtype=torch.int32)
        scale_high = (packed_scales[:, 8:, None] >> shifts) & 3  # [n, byte 8 + j%4, j//4]
        scale_high = scale_high.transpose(1, 2).reshape(-1, 16)
        scale_low = torch.cat([packed_scales[:, :8] & 0xF, packed_scales[:, :8] >> 4], dim=1)
        sub_scales = ((scale_low | (scale_high << 4)) - 32).to(torch.float32)
        low = ((qs >> shifts.reshape(1, 1, 4, 1)) & 3).reshape(-1, 256)
        bits = torch.arange(8, device=data.device, dtype=torch.int32).reshape(1, 8, 1)
        high = ((hmask[:, None, :] >> bits) & 1).reshape(-1, 256)
        # a clear high bit means 4 below: ggml's `q - (hm & m ? 0 : 4)`
        q = (low - 4 * (1 - high)).reshape(-1, 16, 16).to(torch.float32)
        return ((d[:, None] * sub_scales)[:, :, None] * q).reshape(-1, 256)


def _q3_k_reference_finish_kernel(blocks: torch.Tensor, scales: torch.Tensor, levels: torch.Tensor) -> tuple:
    """Q3_K's reference path after make_q3_quants, fused by ``compiled``: the same float32 steps as
    ``Q3_K._reference_scales``, ``_sym_requantize`` and the packing in ``quantize_blocks``, per super-block
    (``blocks`` [n, 256], ``scales`` [n, 16], ``levels`` [n, 256] in [0, 8)). Returns hmask [n, 32], qs [n, 64],
    the packed 6-bit scales [n, 12] (uint8) and d [n] (float16)."""
    _, max_scale = search.first_largest_magnitude([scales[:, j] for j in range(16)])
    nonzero = max_scale != 0
    inverse_scale = search.divide_scalar_by(-32.0, torch.where(nonzero, max_scale, torch.ones_like(max_scale)))
    sub_scales = search.nearest_int(inverse_scale[:, None] * scales).clamp(-32, 31) + 32
    sub_scales = torch.where(nonzero[:, None], sub_scales, torch.zeros_like(sub_scales))
    d = torch.where(nonzero, search.divide_scalar_by(1.0, inverse_scale), torch.zeros_like(max_scale))
    d_half = d.to(torch.float16)
    sub_block_scales = d_half.to(torch.float32)[:, None] * (sub_scales - 32).to(torch.float32)  # [n, 16]
    # _sym_requantize: each sub-block rounded again with its stored scale; a zero scale keeps the levels
    has_scale = sub_block_scales != 0
    divisor = torch.where(has_scale, sub_block_scales, torch.ones_like(sub_block_scales))
    x = blocks.reshape(-1, 16, 16)
    requantized = search.nearest_int(x / divisor[:, :, None]).clamp(-4, 3) + 4
    final = torch.where(has_scale[:, :, None], requantized, levels.reshape(-1, 16, 16)).reshape(-1, 256)
    # hmask byte m, bit b: the high bit of value 32·b + m
    hmask = final[:, 0:32] >> 2
    for b in range(1, 8):
        hmask = hmask | ((final[:, 32 * b:32 * b + 32] >> 2) << b)
    # qs: in each 128-value half, byte m holds values m, m+32, m+64, m+96 (2 bits each)
    low = final & 3
    qs = torch.cat([low[:, h:h + 32] | (low[:, h + 32:h + 64] << 2) | (low[:, h + 64:h + 96] << 4)
                    | (low[:, h + 96:h + 128] << 6) for h in (0, 128)], dim=1)
    scale_low = sub_scales & 0xF
    scale_high = sub_scales >> 4
    packed_scales = torch.cat([scale_low[:, :8] | (scale_low[:, 8:] << 4),
                               scale_high[:, 0:4] | (scale_high[:, 4:8] << 2) | (scale_high[:, 8:12] << 4)
                               | (scale_high[:, 12:16] << 6)], dim=1)
    return hmask.to(torch.uint8), qs.to(torch.uint8), packed_scales.to(torch.uint8), d_half


# ==== end of symmetric ====

# ==== scale + min: Q2_K, Q4_K, Q5_K ====
_MM_QK_K = 256


def _mm_fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """float32 ``[n]`` → ggml_half little-endian bytes ``[n, 2]`` (round to nearest even, as GGML_FP32_TO_FP16)."""
    return values.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _mm_fp16_value(data: torch.Tensor) -> torch.Tensor:
    """ggml_half bytes ``[n, 2]`` → float32 ``[n]``."""
    return data.contiguous().view(torch.float16).reshape(-1).to(torch.float32)


def _mm_to_uint8(levels: torch.Tensor) -> torch.Tensor:
    """C's (uint8_t) of an int: keep the low 8 bits."""
    return torch.bitwise_and(levels.to(torch.int64), 0xFF)


def _mm_positive_max(values: torch.Tensor) -> torch.Tensor:
    """Largest value per row, or +0 when none is positive (ggml starts from 0 and keeps `v > max`: -0 stays +0)."""
    top = values.amax(dim=1)
    return torch.where(top > 0, top, torch.zeros_like(top))


def _mm_pack_k4_scales(scale_levels: torch.Tensor, min_levels: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit sub-block scales and mins ``[n, 8]`` → the 12 bytes get_scale_min_k4 reads:
    bytes 0-3 scale 0-3 (+ top bits of scale 4-7), 4-7 min 0-3 (+ top bits of min 4-7), 8-11 low nibbles of 4-7."""
    ls = scale_levels.to(torch.int64)
    lm = min_levels.to(torch.int64)
    first = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    second = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    third = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return torch.cat([first, second, third], dim=1).to(torch.uint8)


def _mm_unpack_k4_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of _mm_pack_k4_scales, as llama.cpp's get_scale_min_k4: 12 bytes → scales, mins ``[n, 8]``."""
    q = packed.to(torch.int64)
    scales = torch.cat([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], dim=1)
    mins = torch.cat([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], dim=1)
    return scales, mins


def _mm_requantize(x: torch.Tensor, levels: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor,
                   scales: torch.Tensor, mins: torch.Tensor, nmax: int) -> torch.Tensor:
    """Final levels from the stored (fp16) super-block scales, as the last loop of quantize_row_q*_K:
    L = nearest_int((x + dmin*m)/(d*sc)); a sub-block whose scale is 0 keeps the levels of the search.

    x: ``[n, n_sub, sub_size]``; levels uint8 same shape; d, dmin ``[n]``; scales, mins ``[n, n_sub]``."""
    sub_scale = d[:, None] * scales.to(torch.float32)
    sub_min = dmin[:, None] * mins.to(torch.float32)
    keep = sub_scale == 0
    safe_scale = torch.where(keep, torch.ones_like(sub_scale), sub_scale)
    fresh = search._mm_nearest_int((x + sub_min[..., None]) / safe_scale[..., None]).clamp_(0, nmax)
    return torch.where(keep[..., None], levels.to(torch.float32), fresh).to(torch.uint8)


def _mm_superblock_sigma2(x: torch.Tensor, factor: float) -> torch.Tensor:
    """factor * sum(x²) / QK_K per super-block, summed in order (quantize_row_q2/q4/q5_K_impl)."""
    return search._mm_over_scalar(factor * search._mm_sequential_sum(x * x), _MM_QK_K)


def _mm_k4_search(x: torch.Tensor, importance: torch.Tensor | None, nmax: int, rmin: float, rdelta: float,
                  nstep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K up to the stored super-block scales: quantize_row_q4_K_ref/_impl (q5 alike).

    Returns (the first 16 bytes of each block: d, dmin, 12 scale bytes; final levels uint8 ``[n, 8, 32]``)."""
    n_blocks = x.shape[0]
    sub = x.reshape(n_blocks * 8, 32)
    if importance is None:
        # ref path: make_qkx2_quants weighted by rms(sub-block) + |x|
        av_x = search._mm_sqrt(search._mm_over_scalar(search._mm_sequential_sum(sub * sub), 32))
        weights = av_x[:, None] + sub.abs()
        scales, mins, levels = search.make_qkx2_quants(sub, weights, nmax, rmin, rdelta, nstep, False)
        scales = scales.reshape(n_blocks, 8)
        mins = mins.reshape(n_blocks, 8)
        max_scale = _mm_positive_max(scales)
        max_min = _mm_positive_max(mins)
        inv_scale = torch.where(max_scale > 0, search._mm_scalar_over(63.0, max_scale), torch.zeros_like(max_scale))
        inv_min = torch.where(max_min > 0, search._mm_scalar_over(63.0, max_min), torch.zeros_like(max_min))
        scale_levels = _mm_to_uint8(search._mm_nearest_int(inv_scale[:, None] * scales)).clamp(max=63)
        min_levels = _mm_to_uint8(search._mm_nearest_int(inv_min[:, None] * mins)).clamp(max=63)
        d_block = search._mm_over_scalar(max_scale, 63.0)
        m_block = search._mm_over_scalar(max_min, 63.0)
    else:
        # impl path: make_qkx3_quants weighted by importance * sqrt(sigma² + x²), then make_qp_quants on the
        # sub-block scales and mins, weighted by each sub-block's total weight
        sigma2 = _mm_superblock_sigma2(x, 2.0)
        weights = importance * search._mm_sqrt(sigma2[:, None] + x * x)
        weights = weights.reshape(n_blocks * 8, 32)
        sub_weight = search._mm_sequential_sum(weights).reshape(n_blocks, 8)
        scales, mins, levels = search.make_qkx3_quants(sub, weights, nmax, -0.9, 0.05, 36, False)
        d_block, scale_levels = search.make_qp_quants(scales.reshape(n_blocks, 8), 63, sub_weight)
        m_block, min_levels = search.make_qp_quants(mins.reshape(n_blocks, 8), 63, sub_weight)
    packed = _mm_pack_k4_scales(scale_levels, min_levels)
    d_bytes = _mm_fp16_bytes(d_block)
    dmin_bytes = _mm_fp16_bytes(m_block)
    d = _mm_fp16_value(d_bytes)
    dmin = _mm_fp16_value(dmin_bytes)
    sc, m = _mm_unpack_k4_scales(packed)
    levels = _mm_requantize(x.reshape(n_blocks, 8, 32), levels.reshape(n_blocks, 8, 32), d, dmin, sc, m, nmax)
    return torch.cat([d_bytes, dmin_bytes, packed], dim=1), levels


def _mm_k4_dequantize_scales(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sub-block scale d*sc and min dmin*m ``[n, 8]`` from the first 16 bytes of a Q4_K/Q5_K block."""
    d = _mm_fp16_value(data[:, 0:2])
    dmin = _mm_fp16_value(data[:, 2:4])
    sc, m = _mm_unpack_k4_scales(data[:, 4:16])
    return d[:, None] * sc.to(torch.float32), dmin[:, None] * m.to(torch.float32)


class Q4_K(BlockFormat):
    """4.5 bits: super-blocks of 8 × 32 weights, each sub-block ``d*sc*q - dmin*m`` with 6-bit sc, m."""

    name = "Q4_K"
    block_size = _MM_QK_K
    bytes_per_block = 144  # d, dmin (fp16), 12 bytes of scales/mins, 128 bytes of 4-bit quants

    def quantize_blocks(self, blocks: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        header, levels = _mm_k4_search(blocks, importance, 15, -1.0, 0.1, 20)
        # qs: each 64-weight chunk is 32 bytes, low nibble from its first 32 weights, high from the next 32
        pairs = levels.reshape(-1, 4, 2, 32)
        qs = pairs[:, :, 0, :] | (pairs[:, :, 1, :] << 4)
        return torch.cat([header, qs.reshape(-1, 128)], dim=1)

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        scale, offset = _mm_k4_dequantize_scales(data)
        qs = data[:, 16:].reshape(-1, 4, 1, 32)
        q = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(-1, 8, 32).to(torch.float32)
        return (scale[..., None] * q - offset[..., None]).reshape(-1, _MM_QK_K)


class Q5_K(BlockFormat):
    """5.5 bits: Q4_K's super-block with 5-bit levels (the fifth bit in qh)."""

    name = "Q5_K"
    block_size = _MM_QK_K
    bytes_per_block = 176  # d, dmin, 12 bytes of scales/mins, 32 bytes of high bits, 128 bytes of low nibbles

    def quantize_blocks(self, blocks: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        header, levels = _mm_k4_search(blocks, importance, 31, -0.5, 0.1, 15)
        # as quantize_row_q5_K_ref: chunk k of 64 weights puts weight j's fifth bit in bit 2k of qh[j],
        # weight j+32's in bit 2k+1, and the low nibbles in ql as Q4_K's qs
        # (in uint8 with explicit ORs: int64 and a sum over the bit positions took 7x as long)
        runs = levels.reshape(-1, 8, 32)  # run r = 2k + half of 32 weights; its fifth bits go to bit r of qh
        low = runs & 0xF
        ql = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(-1, 128)
        high = runs >> 4
        qh = high[:, 0]
        for run in range(1, 8):
            qh = qh | (high[:, run] << run)
        return torch.cat([header, qh, ql], dim=1)

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        scale, offset = _mm_k4_dequantize_scales(data)
        qh = data[:, 16:48].to(torch.int64)
        qs = data[:, 48:].reshape(-1, 4, 1, 32).to(torch.int64)
        low = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(-1, 8, 32)
        high = (qh[:, None, :] >> torch.arange(8, device=data.device)[None, :, None]) & 1
        q = (low | (high << 4)).to(torch.float32)
        return (scale[..., None] * q - offset[..., None]).reshape(-1, _MM_QK_K)


def _mm_q2_k_header(x: torch.Tensor, importance: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Q2_K up to the final levels: quantize_row_q2_K_ref (importance None) or quantize_row_q2_K_impl.

    Returns (``[n, 20]``: the 16 scale|min<<4 bytes then d and dmin; final levels uint8 ``[n, 16, 16]``)."""
    n_blocks = x.shape[0]
    sub = x.reshape(n_blocks * 16, 16)
    if importance is None:
        # ref: make_qkx2_quants on |x|-weighted absolute errors, then 4-bit scales/mins relative to the largest
        scales, mins, levels = search.make_qkx2_quants(sub, sub.abs(), 3, -0.5, 0.1, 15, True)
        scales = scales.reshape(n_blocks, 16)
        mins = mins.reshape(n_blocks, 16)
        max_scale = _mm_positive_max(scales)
        max_min = _mm_positive_max(mins)
        has_scale = max_scale > 0
        has_min = max_min > 0
        safe_scale = torch.where(has_scale, max_scale, torch.ones_like(max_scale))
        safe_min = torch.where(has_min, max_min, torch.ones_like(max_min))
        scale_levels = _mm_to_uint8(search._mm_nearest_int(search._mm_scalar_over(15.0, safe_scale)[:, None] * scales))
        min_levels = _mm_to_uint8(search._mm_nearest_int(search._mm_scalar_over(15.0, safe_min)[:, None] * mins))
        scale_levels = torch.where(has_scale[:, None], scale_levels, torch.zeros_like(scale_levels))
        min_levels = torch.where(has_min[:, None], min_levels, torch.zeros_like(min_levels))
        d_block = torch.where(has_scale, search._mm_over_scalar(max_scale, 15.0), torch.zeros_like(max_scale))
        m_block = torch.where(has_min, search._mm_over_scalar(max_min, 15.0), torch.zeros_like(max_min))
    else:
        # impl: make_qkx3_quants weighted by importance * sqrt(sigma² + x²), make_qp_quants on scales and mins
        sigma2 = _mm_superblock_sigma2(x, 1.0)
        weights = (importance * search._mm_sqrt(sigma2[:, None] + x * x)).reshape(n_blocks * 16, 16)
        sub_weight = search._mm_sequential_sum(weights).reshape(n_blocks, 16)
        scales, mins, levels = search.make_qkx3_quants(sub, weights, 3, -0.9, 0.05, 36, False)
        d_block, scale_levels = search.make_qp_quants(scales.reshape(n_blocks, 16), 15, sub_weight)
        m_block, min_levels = search.make_qp_quants(mins.reshape(n_blocks, 16), 15, sub_weight)
        scale_levels = scale_levels.to(torch.int64)
        min_levels = min_levels.to(torch.int64)
    packed = (scale_levels | (min_levels << 4)) & 0xFF
    d_bytes = _mm_fp16_bytes(d_block)
    dmin_bytes = _mm_fp16_bytes(m_block)
    levels = _mm_requantize(x.reshape(n_blocks, 16, 16), levels.reshape(n_blocks, 16, 16), _mm_fp16_value(d_bytes),
                            _mm_fp16_value(dmin_bytes), packed & 0xF, packed >> 4, 3)
    return torch.cat([packed.to(torch.uint8), d_bytes, dmin_bytes], dim=1), levels


class Q2_K(BlockFormat):
    """2.625 bits: super-blocks of 16 × 16 weights, each sub-block ``d*sc*q - dmin*m`` with 4-bit sc, m."""

    name = "Q2_K"
    block_size = _MM_QK_K
    bytes_per_block = 84  # 16 bytes of scale|min nibbles, 64 bytes of 2-bit quants, d, dmin (fp16)

    def quantize_blocks(self, blocks: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        header, levels = _mm_q2_k_header(blocks, importance)
        # qs: each 128-weight half is 32 bytes; byte l holds weights l, l+32, l+64, l+96 at bits 0, 2, 4, 6
        quarters = levels.reshape(-1, 2, 4, 32).to(torch.int64)
        qs = (quarters << (2 * torch.arange(4, device=blocks.device))[None, None, :, None]).sum(dim=2)
        return torch.cat([header[:, :16], qs.reshape(-1, 64).to(torch.uint8), header[:, 16:]], dim=1)

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        packed = data[:, :16].to(torch.int64)
        d = _mm_fp16_value(data[:, 80:82])
        dmin = _mm_fp16_value(data[:, 82:84])
        scale = d[:, None] * (packed & 0xF).to(torch.float32)
        offset = dmin[:, None] * (packed >> 4).to(torch.float32)
        qs = data[:, 16:80].reshape(-1, 2, 1, 32).to(torch.int64)
        q = (qs >> (2 * torch.arange(4, device=data.device))[None, None, :, None]) & 3
        q = q.reshape(-1, 16, 16).to(torch.float32)
        return (scale[..., None] * q - offset[..., None]).reshape(-1, _MM_QK_K)


# ==== end of scale + min ====
