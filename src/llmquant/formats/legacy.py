"""llama.cpp's legacy formats: 32-weight blocks with one fp16 scale (and a min for the _1 types).

Q8_0, Q4_0, Q5_0 (symmetric) and Q4_1, Q5_1 (scale + min), each with ggml's plain reference path and,
with an importance vector, its weighted search.
"""

from __future__ import annotations

import numpy as np
import torch

from llmquant.formats import compiled, search
from llmquant.formats.base import BlockFormat

# ==== symmetric: Q8_0, Q4_0, Q5_0 ====


def _sym_fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """float32 ``[n]`` → ggml_half bytes ``[n, 2]`` (little-endian; torch rounds to nearest even like ggml)."""
    return values.to(torch.float16).view(torch.uint8).reshape(-1, 2)


def _sym_fp16_values(data: torch.Tensor) -> torch.Tensor:
    """ggml_half bytes ``[n, 2]`` → float32 ``[n]``."""
    return data.contiguous().view(torch.float16).to(torch.float32).reshape(-1)


def _sym_round_half_away(values: torch.Tensor) -> torch.Tensor:
    """C's roundf (ties away from zero); torch.round ties to even. Exact: the fraction of a float is exact."""
    magnitude = values.abs()
    whole = magnitude.floor()
    rounded = torch.where(magnitude - whole >= 0.5, whole + 1, whole)
    return torch.copysign(rounded, values)


def _sym_c_float_to_int8(values: torch.Tensor) -> torch.Tensor:
    """C's ``(int8_t)`` of a float as ggml's x86 build does it (cvttss2si/cvttps2dq, then the low byte):
    truncate toward zero; NaN, ±inf and values beyond int32 become INT_MIN, whose low byte is 0.
    Denormal blocks reach this with an infinite inverse scale."""
    valid = values.abs() < 2.0**31
    whole = torch.where(valid, values, torch.zeros_like(values)).trunc().to(torch.int64)
    return torch.where(valid, torch.remainder(whole + 128, 256) - 128, torch.zeros_like(whole))


def _sym_inverse_or_zero(scale: torch.Tensor) -> torch.Tensor:
    # ggml's `id = d ? 1.0f/d : 0.0f`
    nonzero = scale != 0
    safe = torch.where(nonzero, scale, torch.ones_like(scale))
    return torch.where(nonzero, search.divide_scalar_by(1.0, safe), torch.zeros_like(scale))


def _sym_row_mean_square(rows: torch.Tensor) -> torch.Tensor:
    """``sigma2`` of ggml's quantize_row_q4_0_impl / q5_0_impl: the row's sum of x², summed left to right
    in float, over the row length."""
    sum_x2 = search.sequential_sum(rows * rows)
    return sum_x2 / torch.full_like(sum_x2, float(rows.shape[1]))


# below this a block's scale is a denormal, whose inverse may be inaccurate or infinite: those chunks take the
# exact slow path (C's wrapping conversions); above it every scaled value is provably in range
_SYM_FLT_MIN = 2.0**-126
# the float just below 0.5: trunc(y + copysign(it, y)) is C's roundf(y) for every float y (checked exhaustively)
_SYM_HALF_BELOW = 0.49999997


def _sym_subnormal(scale: torch.Tensor) -> torch.Tensor:
    """Which scales are nonzero denormals (in eager code and inside the fused kernels)."""
    magnitude = scale.abs()
    return (magnitude > 0) & (magnitude < _SYM_FLT_MIN)


def _sym_scales_are_normal(scale: torch.Tensor) -> bool:
    return not bool(_sym_subnormal(scale).any())


def _sym_reference_levels_fast(blocks: torch.Tensor, inverse: torch.Tensor, nmax: int) -> torch.Tensor:
    """quantize_row_q4_0_ref's ``MIN(2·nmax - 1, (int8_t)(x/d + nmax + 0.5))`` as uint8, for normal scales:
    the sum is then in [0.49, 2·nmax + 0.51], so clamping before a truncating conversion is the same."""
    scaled = torch.mul(blocks, inverse[:, None])
    scaled.add_(nmax + 0.5).clamp_(max=2 * nmax - 1)
    return scaled.to(torch.int8).view(torch.uint8)


def _sym_pack_nibbles_u8(levels: torch.Tensor, out: torch.Tensor) -> None:
    # as _sym_pack_nibbles, on uint8 levels already below 16, written into ``out`` [n, 16]
    torch.bitwise_or(levels[:, :16], levels[:, 16:] << 4, out=out)


def _sym_fifth_bits(levels: torch.Tensor) -> torch.Tensor:
    """Q5_0's qh from uint8 levels [n, 32]: bit e of the little-endian uint32 is bit 4 of level e.
    Each run of 8 levels is read as one int64; multiplying by 0x0102040810204080 gathers one bit of each of
    its bytes into the top byte, in order."""
    eights = levels.reshape(-1, 32).view(torch.int64)  # [n, 4]
    bits = (eights >> 4) & 0x0101010101010101
    return (((bits * 0x0102040810204080) >> 56) & 0xFF).to(torch.uint8)


def _sym_scale_and_levels(
    blocks: torch.Tensor, importance: torch.Tensor | None, nmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and levels in [0, 2·nmax) of Q4_0 (nmax 8) and Q5_0 (nmax 16).

    Without importance, ggml's quantize_row_q4_0_ref: the scale maps the value of largest magnitude to
    -nmax and values round by truncating ``x/d + nmax + 0.5``. With importance, quantize_row_q4_0_impl:
    make_qx_quants weighted by ``importance·sqrt(sigma2 + x²)``, sigma2 being the row's mean square.
    """
    if importance is None:
        signed_max = search.signed_absmax(blocks)
        scale = signed_max / torch.full_like(signed_max, float(-nmax))
        scaled = blocks * _sym_inverse_or_zero(scale)[:, None]
        # (uint8_t)MIN(2·nmax - 1, (int8_t)(x/d + nmax + 0.5))
        levels = _sym_c_float_to_int8(scaled + (nmax + 0.5)).clamp_(max=2 * nmax - 1) & 0xFF
        return scale, levels.to(torch.int32)
    # bare blocks (quantize_rows handles whole rows): each block is its own row
    weights = _sym_weights(blocks, importance.reshape(-1, 1, 32), _sym_row_mean_square(blocks))
    return search.make_qx_quants(blocks, nmax, rmse_type=1, weights=weights)


def _sym_weights(rows: torch.Tensor, importance: torch.Tensor, row_sigma2: torch.Tensor) -> torch.Tensor:
    """The legacy types' imatrix weights (quantize_row_q4_0_impl … q5_1_impl) as blocks ``[n_blocks, 32]``:
    ``importance·sqrt(sigma2 + x²)``, sigma2 the row's mean square. ``importance`` broadcasts against the rows
    as ``[n_rows, blocks_per_row, 32]`` (one vector for all rows: ``[1, blocks_per_row, 32]``)."""
    by_row = rows.reshape(rows.shape[0], -1, 32)
    root = search.sqrt_f32(row_sigma2[:, None, None] + by_row * by_row)
    return (importance * root).reshape(-1, 32)


def _sym_reference_kernel(blocks: torch.Tensor, nmax: int) -> tuple:
    """quantize_row_q4_0_ref / q5_0_ref fused by ``compiled``: the first value of largest magnitude,
    ``d = max/-nmax``, levels truncating ``x/d + nmax + 0.5`` (capped at 2·nmax - 1), packed. Returns the
    scale, ``_fused_pack``'s qh and nibbles and whether any scale is subnormal (then the caller takes the exact
    path)."""
    _, signed_max = search.first_largest_magnitude([blocks[:, i] for i in range(32)])
    scale = signed_max / torch.full_like(signed_max, float(-nmax))
    levels = (blocks * _sym_inverse_or_zero(scale)[:, None] + (nmax + 0.5)).clamp(max=2 * nmax - 1).to(torch.int32)
    return scale, *_fused_pack(levels, fifth_bits=nmax == 16), _sym_subnormal(scale).any()


def _fused_pack(levels: torch.Tensor, fifth_bits: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Inside a fused kernel: int32 levels [n, 32] (0..31) → bit 4 of each as uint8 ``[n, 32]`` (the 5-bit types; None
    for the 4-bit ones) and ggml's qs nibbles ``[n, 16]`` (value j low in byte j, value j+16 high). The bits are
    packed into qh outside (``_fused_assemble``): summing them per block inside costs inductor a horizontal
    reduction per block, slower than ggml's scalar loop."""
    nibbles = ((levels[:, :16] & 0xF) | ((levels[:, 16:] & 0xF) << 4)).to(torch.uint8)
    # levels >> 4, not levels >= 16: inductor converts a comparison's mask to bytes ten times slower
    return ((levels >> 4).to(torch.uint8) if fifth_bits else None), nibbles


def _fused_assemble(halves: list[torch.Tensor], fifth: torch.Tensor | None, nibbles: torch.Tensor) -> torch.Tensor:
    """Blocks' bytes from ``_fused_pack``'s parts (on the CPU): the ggml_half of each float32 ``[n]`` in
    ``halves`` (d, then m), qh packed from the bits (bit e of the little-endian uint32: value e's), the nibbles.
    Filled as the fields of a numpy record per block, so each part is one strided copy of whole items."""
    fields = [(f"half{i}", "<f2") for i in range(len(halves))]
    fields += ([("qh", "V4")] if fifth is not None else []) + [("qs", "V16")]
    out = np.empty(nibbles.shape[0], dtype=np.dtype(fields))
    for i, values in enumerate(halves):
        out[f"half{i}"] = values.to(torch.float16).numpy()
    if fifth is not None:
        out["qh"] = np.packbits(fifth.numpy().reshape(-1), bitorder="little").view("V4")
    out["qs"] = nibbles.numpy().reshape(-1).view("V16")
    return torch.from_numpy(out.view(np.uint8).reshape(nibbles.shape[0], -1))


def _sym_pack_nibbles(levels: torch.Tensor) -> torch.Tensor:
    # ggml's qs: byte j holds value j in its low nibble and value j+16 in its high nibble
    # (Q4_0 ORs the byte-wide values; they are nibbles whenever the levels are in range)
    return ((levels[:, :16] | (levels[:, 16:] << 4)) & 0xFF).to(torch.uint8)


def _sym_unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    qs = qs.to(torch.int32)
    return torch.cat([qs & 0xF, qs >> 4], dim=1)


class _SymmetricLegacy(BlockFormat):
    """Q4_0/Q5_0: the imatrix search needs the row's mean square, so rows are quantized here whole."""

    nmax: int

    def _pack(self, scale: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    chunk_weights = 1 << 18  # stays in cache
    chunk_weights_imatrix = 1 << 20  # fewer calls share the row sums' per-column steps
    fused_chunk_weights = 1 << 22  # the kernels stream; fewer calls spread their overhead

    def _pack_fast(self, scale: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def quantize_blocks(self, blocks: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        if importance is None and compiled.enabled(blocks):
            fused = compiled.run(_sym_reference_kernel, (self.nmax,), blocks.contiguous())
            if fused is not None and not bool(fused[3]):
                return _fused_assemble([fused[0]], fused[1], fused[2])
        if importance is None:
            scale = search.signed_absmax(blocks)
            scale = scale / torch.full_like(scale, float(-self.nmax))
            if _sym_scales_are_normal(scale):
                levels = _sym_reference_levels_fast(blocks, _sym_inverse_or_zero(scale), self.nmax)
                return self._pack_fast(scale, levels)
        return self._pack(*_sym_scale_and_levels(blocks, importance, self.nmax))

    def quantize_rows(self, rows: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        n_rows, n_per_row = rows.shape
        blocks = rows.reshape(-1, self.block_size)
        if importance is None:
            return self.quantize_blocks(blocks, None).reshape(n_rows, -1)
        # make_qx_quants weighted by importance·sqrt(sigma2 + x²), sigma2 the row's mean square
        row_sigma2 = _sym_row_mean_square(rows)
        weights = None
        if compiled.enabled(blocks):  # one fused pass instead of six
            weights = compiled.run(_sym_weights, (), rows, importance.reshape(1, -1, 32), row_sigma2)
        if weights is None:
            weights = _sym_weights(rows, importance.reshape(1, -1, 32), row_sigma2)
        scale, levels = search.make_qx_quants(blocks, self.nmax, rmse_type=1, weights=weights)
        return self._pack_fast(scale, levels.to(torch.uint8).contiguous()).reshape(n_rows, -1)


def _q8_0_kernel(blocks: torch.Tensor) -> tuple:
    """quantize_row_q8_0_ref fused by ``compiled``: ``d = amax/127``, levels ``roundf(x/d)`` (as the eager fast
    path computes them). Returns the scale, the int8 levels and whether any scale is subnormal (then the caller
    takes the exact path)."""
    amax = blocks.abs().amax(dim=1)
    scale = amax / torch.full_like(amax, 127.0)
    scaled = blocks * _sym_inverse_or_zero(scale)[:, None]
    levels = (scaled + torch.sign(scaled) * _SYM_HALF_BELOW).to(torch.int8)
    return scale, levels, _sym_subnormal(scale).any()


def _q8_0_assemble(scale: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Q8_0 blocks' bytes from the kernel's float32 scales ``[n]`` and int8 levels ``[n, 32]``."""
    out = np.empty(levels.shape[0], dtype=np.dtype([("d", "<f2"), ("qs", "V32")]))
    out["d"] = scale.to(torch.float16).numpy()
    out["qs"] = levels.numpy().reshape(-1).view("V32")
    return torch.from_numpy(out.view(np.uint8).reshape(levels.shape[0], 34))


class Q8_0(BlockFormat):
    """8-bit levels and one fp16 scale per 32 weights: ggml's quantize_row_q8_0_ref (ggml ignores the imatrix)."""

    name = "Q8_0"
    block_size = 32
    bytes_per_block = 34

    chunk_weights = 1 << 18  # stays in cache
    fused_chunk_weights = 1 << 22  # the kernel streams; fewer calls spread its overhead

    def quantize_blocks(self, blocks: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        if compiled.enabled(blocks):
            fused = compiled.run(_q8_0_kernel, (), blocks)
            if fused is not None and not bool(fused[2]):
                return _q8_0_assemble(fused[0], fused[1])
        amax = blocks.abs().amax(dim=1)
        scale = amax / torch.full_like(amax, 127.0)
        if _sym_scales_are_normal(scale):
            # |x/d| <= 127.00003: roundf and the int8 conversion need no wrapping
            scaled = torch.mul(blocks, _sym_inverse_or_zero(scale)[:, None])
            scaled.add_(torch.sign(scaled), alpha=_SYM_HALF_BELOW)
            out = torch.empty((blocks.shape[0], 34), dtype=torch.uint8, device=blocks.device)
            out[:, :2] = _sym_fp16_bytes(scale)
            out[:, 2:] = scaled.to(torch.int8).view(torch.uint8)
            return out
        levels = _sym_c_float_to_int8(_sym_round_half_away(blocks * _sym_inverse_or_zero(scale)[:, None]))
        levels = levels.to(torch.int8)
        return torch.cat([_sym_fp16_bytes(scale), levels.view(torch.uint8)], dim=1)

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        scale = _sym_fp16_values(data[:, :2])
        return data[:, 2:].contiguous().view(torch.int8).to(torch.float32) * scale[:, None]


class Q4_0(_SymmetricLegacy):
    """4-bit levels around 8 and one fp16 scale per 32 weights."""

    name = "Q4_0"
    block_size = 32
    bytes_per_block = 18
    nmax = 8

    def _pack(self, scale: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        return torch.cat([_sym_fp16_bytes(scale), _sym_pack_nibbles(levels)], dim=1)

    def _pack_fast(self, scale: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        out = torch.empty((levels.shape[0], 18), dtype=torch.uint8, device=levels.device)
        out[:, :2] = _sym_fp16_bytes(scale)
        _sym_pack_nibbles_u8(levels, out[:, 2:])
        return out

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        scale = _sym_fp16_values(data[:, :2])
        levels = _sym_unpack_nibbles(data[:, 2:]) - 8
        return levels.to(torch.float32) * scale[:, None]


class Q5_0(_SymmetricLegacy):
    """5-bit levels around 16 (low nibbles in qs, fifth bits in a 32-bit qh) and one fp16 scale per 32 weights."""

    name = "Q5_0"
    block_size = 32
    bytes_per_block = 22
    nmax = 16

    def _pack(self, scale: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        # qh: bit e of the little-endian uint32 is the fifth bit of value e
        fifth = ((levels >> 4) & 1).reshape(-1, 4, 8)
        shifts = torch.arange(8, device=levels.device, dtype=torch.int32)
        qh = (fifth << shifts).sum(dim=2).to(torch.uint8)
        return torch.cat([_sym_fp16_bytes(scale), qh, _sym_pack_nibbles(levels & 0xF)], dim=1)

    def _pack_fast(self, scale: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        out = torch.empty((levels.shape[0], 22), dtype=torch.uint8, device=levels.device)
        out[:, :2] = _sym_fp16_bytes(scale)
        out[:, 2:6] = _sym_fifth_bits(levels)
        _sym_pack_nibbles_u8(levels & 0xF, out[:, 6:])
        return out

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        scale = _sym_fp16_values(data[:, :2])
        shifts = torch.arange(8, device=data.device, dtype=torch.int32)
        fifth = ((data[:, 2:6].to(torch.int32)[:, :, None] >> shifts) & 1).reshape(-1, 32)
        levels = (_sym_unpack_nibbles(data[:, 6:]) | (fifth << 4)) - 16
        return levels.to(torch.float32) * scale[:, None]


# ==== end of symmetric ====

# ==== scale + min: Q4_1, Q5_1 ====


def _aff_scale_and_min(blocks: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_row_q4_1_ref / q5_1_ref's d = (max - min)/nmax and min (the first of a +0/-0 tie, as ggml)."""
    low = _aff_extreme(blocks, largest=False)
    high = _aff_extreme(blocks, largest=True)
    return search._mm_over_scalar(high - low, float(nmax)), low


def _aff_reference(blocks: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, nmax: int) -> torch.Tensor:
    """quantize_row_q4_1_ref / q5_1_ref's levels (uint8_t)((x - min)/d + 0.5) (Q4_1 caps at 15), with C's
    wrapping conversions for any scale: level bytes as int64 0..255."""
    levels = _sym_c_float_to_int8((blocks - low[:, None]) * _sym_inverse_or_zero(scale)[:, None] + 0.5)
    if nmax == 15:
        levels = levels.clamp(max=15)  # MIN(15, (int8_t)...) compares as signed
    return levels & 0xFF


def _aff_extreme(x: torch.Tensor, largest: bool) -> torch.Tensor:
    """As search._mm_first_extreme, fast: torch's amax/amin is the answer unless it is a zero, where +0 and -0
    may tie and ggml keeps the first; only those rows take the slow search."""
    extreme = x.amax(dim=1) if largest else x.amin(dim=1)
    zero = extreme == 0
    if bool(zero.any()):
        rows = zero.nonzero().squeeze(1)
        extreme[rows] = search._mm_first_extreme(x[rows], largest)
    return extreme


def _aff_plain(scale: torch.Tensor) -> torch.Tensor:
    """Which scales are zero or finite normal floats (in eager code and inside the fused kernel)."""
    magnitude = scale.abs()
    return (magnitude == 0) | ((magnitude >= _SYM_FLT_MIN) & (magnitude < float("inf")))


def _aff_scales_are_plain(scale: torch.Tensor) -> bool:
    """Every scale zero or a finite normal float: then the truncating conversions need no C wrapping."""
    return bool(_aff_plain(scale).all())


def _aff_reference_kernel(blocks: torch.Tensor, nmax: int) -> tuple:
    """quantize_row_q4_1_ref / q5_1_ref fused by ``compiled``: min and max as ggml's loop keeps them (the first
    of a +0/-0 tie), ``d = (max - min)/nmax``, levels truncating ``(x - min)/d + 0.5``, packed. Returns d, min,
    ``_fused_pack``'s qh and nibbles and whether every scale is plain (``_aff_scales_are_plain``; else the caller
    takes the exact path)."""
    low = blocks[:, 0]
    high = blocks[:, 0]
    for i in range(1, 32):
        low = torch.where(blocks[:, i] < low, blocks[:, i], low)
        high = torch.where(blocks[:, i] > high, blocks[:, i], high)
    scale = (high - low) / torch.full_like(low, float(nmax))
    shifted = (blocks - low[:, None]) * _sym_inverse_or_zero(scale)[:, None] + 0.5
    if nmax == 15:
        shifted = shifted.clamp(max=15)  # MIN(15, (int8_t)...)
    return scale, low, *_fused_pack(shifted.to(torch.int32), fifth_bits=nmax == 31), _aff_plain(scale).all()


def _aff_reference_fast(blocks: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, nmax: int) -> torch.Tensor:
    """_aff_reference as uint8 levels, for plain scales (``_aff_scales_are_plain``): then ``(x - min)/d + 0.5``
    lies in [0.5, nmax + 0.51] and a plain truncating conversion is C's."""
    shifted = torch.sub(blocks, low[:, None]).mul_(_sym_inverse_or_zero(scale)[:, None]).add_(0.5)
    if nmax == 15:
        shifted.clamp_(max=15)  # MIN(15, (int8_t)...)
    return shifted.to(torch.uint8)


def _aff_weighted(blocks: torch.Tensor, weights: torch.Tensor,
                  nmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_row_q4_1_impl / q5_1_impl: make_qkx3_quants weighted by ``_sym_weights``."""
    scale, the_min, levels = search.make_qkx3_quants(blocks, weights, nmax, -0.9, 0.05, 36, False)
    return scale, -the_min, levels.to(torch.int64)


class _AffineLegacy(BlockFormat):
    """Q4_1/Q5_1: ``x ≈ d*q + m`` per 32 weights. The imatrix search weighs by the row's mean square, so rows
    are quantized here whole; bare blocks with importance act as rows of one block."""

    block_size = 32
    nmax: int

    def _pack(self, scale: torch.Tensor, low: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _pack_fast(self, scale: torch.Tensor, low: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """As _pack, for uint8 levels in range, written straight into the output."""
        raise NotImplementedError

    chunk_weights = 1 << 18  # the reference path's temporaries stay in cache
    chunk_weights_imatrix = 1 << 18  # so do the (eager) imatrix search's
    fused_chunk_weights = 1 << 22  # the reference kernel streams; fewer calls spread its overhead

    def quantize_blocks(self, blocks: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        if importance is None and compiled.enabled(blocks):
            fused = compiled.run(_aff_reference_kernel, (self.nmax,), blocks.contiguous())
            if fused is not None and bool(fused[4]):
                return _fused_assemble([fused[0], fused[1]], fused[2], fused[3])
        if importance is None:
            scale, low = _aff_scale_and_min(blocks, self.nmax)
            if _aff_scales_are_plain(scale):
                return self._pack_fast(scale, low, _aff_reference_fast(blocks, scale, low, self.nmax))
            return self._pack(scale, low, _aff_reference(blocks, scale, low, self.nmax))
        # bare blocks with importance: each block is its own row
        weights = _sym_weights(blocks, importance.reshape(-1, 1, 32), _sym_row_mean_square(blocks))
        return self._pack(*_aff_weighted(blocks, weights, self.nmax))

    def quantize_rows(self, rows: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        n_rows = rows.shape[0]
        blocks = rows.reshape(-1, self.block_size)
        if importance is None:
            return self.quantize_blocks(blocks, None).reshape(n_rows, -1)
        weights = _sym_weights(rows, importance.reshape(1, -1, 32), _sym_row_mean_square(rows))
        return self._pack(*_aff_weighted(blocks, weights, self.nmax)).reshape(n_rows, -1)

    def _levels(self, data: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        scale = _sym_fp16_values(data[:, 0:2])
        low = _sym_fp16_values(data[:, 2:4])
        return scale[:, None] * self._levels(data).to(torch.float32) + low[:, None]


class Q4_1(_AffineLegacy):
    """4-bit levels, an fp16 scale and an fp16 min per 32 weights."""

    name = "Q4_1"
    bytes_per_block = 20  # d, m (fp16), 16 bytes: value j in the low nibble of byte j, value j+16 in the high
    nmax = 15

    def _pack(self, scale: torch.Tensor, low: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        qs = (levels[:, :16] | (levels[:, 16:] << 4)) & 0xFF
        return torch.cat([_sym_fp16_bytes(scale), _sym_fp16_bytes(low), qs.to(torch.uint8)], dim=1)

    def _pack_fast(self, scale: torch.Tensor, low: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        out = torch.empty((levels.shape[0], 20), dtype=torch.uint8, device=levels.device)
        out[:, :2] = _sym_fp16_bytes(scale)
        out[:, 2:4] = _sym_fp16_bytes(low)
        _sym_pack_nibbles_u8(levels, out[:, 4:])
        return out

    def _levels(self, data: torch.Tensor) -> torch.Tensor:
        qs = data[:, 4:].to(torch.int64)
        return torch.cat([qs & 0xF, qs >> 4], dim=1)


class Q5_1(_AffineLegacy):
    """5-bit levels (fifth bits in a 32-bit qh), an fp16 scale and an fp16 min per 32 weights."""

    name = "Q5_1"
    bytes_per_block = 24  # d, m (fp16), qh (bit j: fifth bit of value j), 16 bytes of low nibbles as Q4_1
    nmax = 31

    def _pack(self, scale: torch.Tensor, low: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        qs = (levels[:, :16] & 0xF) | ((levels[:, 16:] & 0xF) << 4)
        fifth = ((levels >> 4) & 1).reshape(-1, 4, 8)
        qh = (fifth << torch.arange(8, device=levels.device)).sum(dim=2)
        parts = [_sym_fp16_bytes(scale), _sym_fp16_bytes(low), qh.to(torch.uint8), qs.to(torch.uint8)]
        return torch.cat(parts, dim=1)

    def _pack_fast(self, scale: torch.Tensor, low: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        out = torch.empty((levels.shape[0], 24), dtype=torch.uint8, device=levels.device)
        out[:, :2] = _sym_fp16_bytes(scale)
        out[:, 2:4] = _sym_fp16_bytes(low)
        out[:, 4:8] = _sym_fifth_bits(levels)
        _sym_pack_nibbles_u8(levels & 0xF, out[:, 8:])
        return out

    def _levels(self, data: torch.Tensor) -> torch.Tensor:
        qh = data[:, 4:8].to(torch.int64)
        fifth = ((qh[:, :, None] >> torch.arange(8, device=data.device)) & 1).reshape(-1, 32)
        qs = data[:, 8:].to(torch.int64)
        return torch.cat([qs & 0xF, qs >> 4], dim=1) | (fifth << 4)


# ==== end of scale + min ====
