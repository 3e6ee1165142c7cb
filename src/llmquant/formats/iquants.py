"""llama.cpp's importance-matrix i-quants: IQ4_NL (32-weight blocks) and IQ4_XS (256-weight super-blocks)
on the non-linear 16-value grid. The 1-3-bit codebook i-quants (IQ3_*, IQ2_*, IQ1_*) are in ``iq_lowbit``.

Both follow ggml-quants.c's ``quantize_row_iq4_nl_impl`` as ``quantize_iq4_nl`` and ``quantize_iq4_xs`` call
it (ntry = 7, with or without quant_weights): per 32-weight sub-block, a weighted least-squares scale chosen
among 16 candidates (the first guess ``-max/values[0]`` and ``ntry = 7`` inverse scales either side); IQ4_XS
then stores the sub-block scales as 6-bit multiples of one fp16 super-block scale. The search is a numba port
in ggml's float32 operation order, so the bytes are ggml's.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from llmquant.formats.base import BlockFormat, Grid, fp16_tensor
from llmquant.formats.legacy import ScaleParams, fp16_bytes, fp16_from_bytes, per_weight
from llmquant.formats.search import (
    GROUP_MAX_EPS,
    f32,
    first_largest_magnitude,
    fp16_bits,
    kernel,
    nearest_int,
    sequential_sum_of_squares,
)

# kvalues_iq4nl (ggml-common.h): the 16 non-linear levels shared by IQ4_NL and IQ4_XS, ascending
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_IQ4_VALUES = np.array(IQ4_LEVELS, dtype=np.float32)  # the grid as the kernels read it (C's int8 → float)

SUB_BLOCK = 32  # weights per scale (QK4_NL, and IQ4_XS's sub-block)
QK_K = 256  # IQ4_XS's super-block
N_TRY = 7  # quantize_iq4_nl / quantize_iq4_xs pass ntry = 7, with or without quant_weights
N_CANDIDATES = 2 * N_TRY + 2  # the first guess, then itry = -ntry … ntry


@kernel
def best_index_int8(values, x):
    """ggml-quants.c's best_index_int8 over the ascending grid ``values`` (float32, the C int8 table converted):
    the index of the nearest value, a tie going to the upper one; NaN gives the last index, as the C search.

    ggml bisects for ``values[mu-1] <= x < values[mu]`` and keeps ``mu - 1`` when ``x - values[mu-1] <
    values[mu] - x``. Here ``mu`` is counted, without branches (the searches call this 16 times a weight):
    the number of values below the last that are not above x, at least 1. That is the bisection's ``mu``
    inside the grid; below it (mu = 1) and above it (mu = n - 1) the same final comparison gives ggml's
    early returns 0 and n - 1, and NaN, never below a value, counts n - 1."""
    upper = 0
    for k in range(values.shape[0] - 1):
        upper += 0 if x < values[k] else 1
    upper = max(upper, 1)
    return upper - 1 if x - values[upper - 1] < values[upper] - x else upper


@kernel
def _sub_block_weights(xb, qw, has_importance, sigma2, weight):
    """quantize_row_iq4_nl_impl's weights: ``qw·sqrtf(sigma2 + x²)`` with importance, else ``x²``."""
    for j in range(xb.shape[0]):
        if has_importance:
            weight[j] = qw[j] * np.sqrt(sigma2 + xb[j] * xb[j])
        else:
            weight[j] = xb[j] * xb[j]


@kernel
def _sub_block_scale(xb, weight, values, inverse, sum_qx, sum_q2):
    """quantize_row_iq4_nl_impl's scale search of one sub-block (ntry = N_TRY > 0): the weighted least-squares
    scale ``Σw·q·x / Σw·q²`` of the first guess ``d = -max/values[0]``, replaced by that of an inverse scale
    ``(itry + values[0])/max`` only when strictly better (``sumqx² > best·sumq2``). 0 for a near-zero
    sub-block. ``inverse``, ``sum_qx``, ``sum_q2``: scratch of N_CANDIDATES.

    ggml runs the candidates one after the other; their sums are independent, so here the loop over the
    candidates is the inner one (each candidate's sums still accumulate over j in ggml's order) and the choice
    among them follows, in ggml's order."""
    amax, signed_max = first_largest_magnitude(xb)
    if amax < GROUP_MAX_EPS:
        return f32(0.0)
    d = -signed_max / values[0]
    inverse[0] = f32(1.0) / d
    for itry in range(-N_TRY, N_TRY + 1):
        # C's int (itry + values[0]) converted to float: exact, as this float sum of small integers
        inverse[itry + N_TRY + 1] = (f32(itry) + values[0]) / signed_max
    for c in range(N_CANDIDATES):
        sum_qx[c] = f32(0.0)
        sum_q2[c] = f32(0.0)
    for j in range(xb.shape[0]):
        x = xb[j]
        w = weight[j]
        for c in range(N_CANDIDATES):
            q = values[best_index_int8(values, inverse[c] * x)]
            sum_qx[c] += w * q * x
            sum_q2[c] += w * q * q
    d = sum_qx[0] / sum_q2[0] if sum_q2[0] > 0 else f32(0.0)
    best = d * sum_qx[0]
    for c in range(1, N_CANDIDATES):
        if sum_q2[c] > 0 and sum_qx[c] * sum_qx[c] > best * sum_q2[c]:
            d = sum_qx[c] / sum_q2[c]
            best = d * sum_qx[c]
    return d


@kernel
def _iq4_nl_search(x, importance, has_importance, values, scale_bits, levels):
    # quantize_iq4_nl → quantize_row_iq4_nl_impl(QK4_NL, 32, ..., ntry = 7): one sub-block per block
    weight = np.empty(SUB_BLOCK, dtype=np.float32)
    inverse = np.empty(N_CANDIDATES, dtype=np.float32)
    sum_qx = np.empty(N_CANDIDATES, dtype=np.float32)
    sum_q2 = np.empty(N_CANDIDATES, dtype=np.float32)
    for b in range(x.shape[0]):
        xb = x[b]
        qw = importance[b] if has_importance else xb
        sigma2 = sequential_sum_of_squares(xb) * (f32(2.0) / f32(SUB_BLOCK))
        _sub_block_weights(xb, qw, has_importance, sigma2, weight)
        d = _sub_block_scale(xb, weight, values, inverse, sum_qx, sum_q2)
        scale_bits[b] = fp16_bits(d)
        # with ntry > 0 ggml picks the levels again with the float scale: id = scales[0] ? 1/scales[0] : 0
        inverse_d = f32(1.0) / d if d != 0 else f32(0.0)
        for j in range(SUB_BLOCK):
            levels[b, j] = best_index_int8(values, inverse_d * xb[j])


@kernel
def _iq4_xs_search(x, importance, has_importance, values, super_scale_bits, sub_scales, levels):
    # quantize_iq4_xs → quantize_row_iq4_nl_impl(QK_K, 32, ..., ntry = 7)
    n_sub = QK_K // SUB_BLOCK
    weight = np.empty(SUB_BLOCK, dtype=np.float32)
    inverse = np.empty(N_CANDIDATES, dtype=np.float32)
    sum_qx = np.empty(N_CANDIDATES, dtype=np.float32)
    sum_q2 = np.empty(N_CANDIDATES, dtype=np.float32)
    scales = np.empty(n_sub, dtype=np.float32)
    for b in range(x.shape[0]):
        sigma2 = sequential_sum_of_squares(x[b]) * (f32(2.0) / f32(QK_K))
        max_scale = f32(0.0)
        amax_scale = f32(0.0)
        for ib in range(n_sub):
            xb = x[b, ib * SUB_BLOCK:(ib + 1) * SUB_BLOCK]
            qw = importance[b, ib * SUB_BLOCK:(ib + 1) * SUB_BLOCK] if has_importance else xb
            _sub_block_weights(xb, qw, has_importance, sigma2, weight)
            d = _sub_block_scale(xb, weight, values, inverse, sum_qx, sum_q2)
            scales[ib] = d
            if abs(d) > amax_scale:  # the first scale of largest magnitude
                amax_scale = abs(d)
                max_scale = d
        # the super-block scale: the largest sub-block scale is -32 of it (an all-zero block stores -0)
        super_scale = -max_scale / f32(32.0)
        super_scale_bits[b] = fp16_bits(super_scale)
        inverse_super = f32(1.0) / super_scale if super_scale != 0 else f32(0.0)
        for ib in range(n_sub):
            sub_scale = max(-32, min(31, nearest_int(inverse_super * scales[ib])))
            sub_scales[b, ib] = sub_scale + 32
            # the levels, picked again with the float super-block scale times the 6-bit sub-block scale
            sub_d = super_scale * f32(sub_scale)
            inverse_sub = f32(1.0) / sub_d if sub_d != 0 else f32(0.0)
            for j in range(ib * SUB_BLOCK, (ib + 1) * SUB_BLOCK):
                levels[b, j] = best_index_int8(values, inverse_sub * x[b, j])


def _importance_argument(blocks: np.ndarray, importance: np.ndarray | None) -> tuple[np.ndarray, bool]:
    """The kernels' (importance, has_importance): a 0-size array stands for ggml's NULL quant_weights."""
    if importance is None:
        return np.empty((0, blocks.shape[1]), dtype=np.float32), False
    return importance, True


def _grid_values(device: torch.device) -> torch.Tensor:
    return torch.tensor(IQ4_LEVELS, dtype=torch.float32, device=device)


def _pack_nibbles(levels: torch.Tensor) -> torch.Tensor:
    """Level indices ``[n, 32·k]`` → ``[n, 16·k]`` bytes: per 32 weights, byte j = L[j] | L[16 + j] << 4."""
    grouped = levels.to(torch.uint8).reshape(levels.shape[0], -1, 2, 16)
    return (grouped[:, :, 0] | (grouped[:, :, 1] << 4)).reshape(levels.shape[0], -1)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of _pack_nibbles: ``[n, 16·k]`` bytes → level indices int32 ``[n, 32·k]``."""
    grouped = packed.reshape(packed.shape[0], -1, 1, 16).to(torch.int32)
    return torch.cat([grouped & 0x0F, grouped >> 4], dim=2).reshape(packed.shape[0], -1)


# ==== IQ4_NL ====


class IQ4_NL(BlockFormat):
    """4.5 bpw: an fp16 scale per 32 weights on the non-linear grid (ggml's quantize_iq4_nl)."""

    name = "IQ4_NL"
    block_size = SUB_BLOCK
    bytes_per_block = 18
    needs_imatrix = True
    levels_from_search = "ggml picks the levels with 1/d of the float scale, before its fp16 rounding"
    Params = ScaleParams

    def search(self, blocks, importance, row_sigma2):
        scale_bits = np.empty(blocks.shape[0], dtype=np.uint16)
        levels = np.empty(blocks.shape, dtype=np.uint8)
        weights, has_importance = _importance_argument(blocks, importance)
        _iq4_nl_search(blocks, weights, has_importance, _IQ4_VALUES, scale_bits, levels)
        return (fp16_tensor(scale_bits),), levels

    def reconstruct(self, params: ScaleParams) -> Grid:
        scale = params.scale
        return Grid(per_weight(scale, SUB_BLOCK), None, _grid_values(scale.device))

    def pack(self, levels: torch.Tensor, params: ScaleParams) -> torch.Tensor:
        return torch.cat([fp16_bytes(params.scale), _pack_nibbles(levels)], dim=1)

    def unpack(self, data: torch.Tensor) -> tuple[torch.Tensor, ScaleParams]:
        return _unpack_nibbles(data[:, 2:]), ScaleParams(fp16_from_bytes(data[:, :2]))


# ==== IQ4_XS ====


class IQ4XSParams(NamedTuple):
    """IQ4_XS's stored parameters: weight = super_scale·(sub_scale - 32)·values[level]."""

    super_scale: torch.Tensor  # float16 [n_blocks]: ggml's d
    sub_scales: torch.Tensor  # uint8 [n_blocks, 8]: the stored 6-bit values 0..63, meaning value - 32


class IQ4_XS(BlockFormat):
    """4.25 bpw: 256-weight super-blocks, an fp16 scale and a 6-bit scale per 32 weights (ggml's quantize_iq4_xs).

    Bytes: d (fp16) | scales_h (uint16, 2 high bits per sub-block) | scales_l (4 bits per sub-block) | qs.
    """

    name = "IQ4_XS"
    block_size = QK_K
    bytes_per_block = 136
    needs_imatrix = True
    levels_from_search = "ggml picks the levels with 1/(d·l) of the float super-block scale, before its fp16 rounding"
    Params = IQ4XSParams

    def search(self, blocks, importance, row_sigma2):
        n = blocks.shape[0]
        super_scale_bits = np.empty(n, dtype=np.uint16)
        sub_scales = np.empty((n, QK_K // SUB_BLOCK), dtype=np.uint8)
        levels = np.empty(blocks.shape, dtype=np.uint8)
        weights, has_importance = _importance_argument(blocks, importance)
        _iq4_xs_search(blocks, weights, has_importance, _IQ4_VALUES, super_scale_bits, sub_scales, levels)
        return (fp16_tensor(super_scale_bits), sub_scales), levels

    def reconstruct(self, params: IQ4XSParams) -> Grid:
        # dequantize_row_iq4_xs: dl = d·(ls - 32), then dl·kvalues[level]
        d = params.super_scale.to(torch.float32)[:, None]
        sub_d = d * (params.sub_scales.to(torch.int32) - 32).to(torch.float32)
        scale = sub_d.repeat_interleave(SUB_BLOCK, dim=1)
        return Grid(scale, None, _grid_values(scale.device))

    def pack(self, levels: torch.Tensor, params: IQ4XSParams) -> torch.Tensor:
        stored = params.sub_scales.to(torch.uint8)
        n = stored.shape[0]
        low = stored & 0x0F
        scales_l = low[:, 0::2] | (low[:, 1::2] << 4)  # [n, 4]: sub-block 2i in the low nibble, 2i+1 high
        high = (stored >> 4).reshape(n, 2, 4)  # 2 bits per sub-block: byte 0 holds sub-blocks 0-3, byte 1 4-7
        scales_h = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
        return torch.cat([fp16_bytes(params.super_scale), scales_h, scales_l, _pack_nibbles(levels)], dim=1)

    def unpack(self, data: torch.Tensor) -> tuple[torch.Tensor, IQ4XSParams]:
        n = data.shape[0]
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=data.device)
        high = ((data[:, 2:4, None] >> shifts) & 3).reshape(n, 8)
        low_bytes = data[:, 4:8]
        low = torch.stack([low_bytes & 0x0F, low_bytes >> 4], dim=2).reshape(n, 8)
        sub_scales = low | (high << 4)
        return _unpack_nibbles(data[:, 8:]), IQ4XSParams(fp16_from_bytes(data[:, :2]), sub_scales)
