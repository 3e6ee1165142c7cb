"""llama.cpp's importance-matrix i-quants: IQ4_NL (32-weight blocks) and IQ4_XS (256-weight super-blocks)
on the non-linear 16-value grid. Later: IQ3_*, IQ2_*, IQ1_* with their grids as data.

Both follow ggml-quants.c's ``quantize_row_iq4_nl_impl``: per 32-weight sub-block, a weighted least-squares
scale chosen among 16 candidates (the first guess ``max/127`` and ``ntry = 7`` neighbours either side);
IQ4_XS then stores the sub-block scales as 6-bit multiples of one fp16 super-block scale. Every float
operation is float32 in ggml's order (sums are accumulated element by element, as the C loops do), so the
bytes match ggml's.
"""

from __future__ import annotations

import functools

import torch

from llmquant.formats import search
from llmquant.formats.base import BlockFormat

# kvalues_iq4nl (ggml-common.h): the 16 non-linear levels shared by IQ4_NL and IQ4_XS
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
SUB_BLOCK = 32  # weights per scale
GROUP_MAX_EPS = 1e-15  # ggml-quants.c GROUP_MAX_EPS: a sub-block with max |x| below this gets scale 0
N_TRY = 7  # quantize_iq4_nl / quantize_iq4_xs pass ntry = 7, with or without quant_weights

# best_index_int8 returns the nearest level, a tie going to the upper one; with these levels its float
# comparison ``x - lo < hi - x`` is exact wherever it can tie, so the index is the number of midpoints
# (lo + hi) / 2 at or below x. The midpoints are half-integers: the index depends only on floor(2x),
# clamped to [_TWICE_LOW, _TWICE_HIGH], which a table turns into the level.
_TWICE_LOW = IQ4_LEVELS[0] + IQ4_LEVELS[1] - 1  # -232: below the first doubled midpoint, level 0 (-127)
_TWICE_HIGH = IQ4_LEVELS[-2] + IQ4_LEVELS[-1]  # 202: from here on level 15 (113)

# sub-blocks searched per pass: keeps the [32, 16 candidates, n] temporaries within the CPU caches
_SUB_BLOCKS_PER_PASS = {"cpu": 512}
_SUB_BLOCKS_PER_PASS_OTHER = 1 << 16


@functools.cache
def _grid_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(levels float32 [16], floor(2x) - _TWICE_LOW → level index uint8, → level value float32) on ``device``."""
    levels = torch.tensor(IQ4_LEVELS, dtype=torch.float32)
    twice_midpoints = torch.tensor([a + b for a, b in zip(IQ4_LEVELS[:-1], IQ4_LEVELS[1:], strict=True)])
    twice_x = torch.arange(_TWICE_LOW, _TWICE_HIGH + 1)
    index = (twice_midpoints[None, :] <= twice_x[:, None]).sum(dim=1)
    return levels.to(device), index.to(torch.uint8).to(device), levels[index].to(device)


def nearest_level_index(scaled: torch.Tensor) -> torch.Tensor:
    """best_index_int8(16, kvalues_iq4nl, x) for every element: uint8 indices 0..15 (NaN → 15, as the C search)."""
    _, index_table, _ = _grid_tables(scaled.device)
    twice = (scaled * 2).nan_to_num_(nan=float(_TWICE_HIGH))  # in place: fresh large tensors cost page faults
    position = twice.clamp_(_TWICE_LOW, _TWICE_HIGH).floor_().sub_(_TWICE_LOW).to(torch.int32)
    return torch.index_select(index_table, 0, position.view(-1)).view(scaled.shape)


def _sqrt_float32(values: torch.Tensor) -> torch.Tensor:
    """sqrtf, correctly rounded: torch's float32 CPU sqrt can be one ulp off; a float64 root rounds exactly."""
    return values.to(torch.float64).sqrt_().to(torch.float32)


def _fp32_to_fp16(values: torch.Tensor) -> torch.Tensor:
    """GGML_FP32_TO_FP16: round to nearest even, overflow to inf."""
    return values.to(torch.float16)


def _nearest_int(values: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: adds 1.5·2^23 and reads the low mantissa bits (round half to even), int32."""
    shifted = (values + 12582912.0).view(torch.int32)
    return (shifted & 0x007FFFFF) - 0x00400000


# every candidate's |x·id| <= 134·(1 + 2⁻²²) as |x| <= max: a table over floor(2x) in ±270 needs no clamp
_SEARCH_LOW = -270


@functools.cache
def _search_level_table(device: torch.device) -> torch.Tensor:
    """floor(2x) - _SEARCH_LOW → the level value best_index_int8 picks, over [_SEARCH_LOW, -_SEARCH_LOW]."""
    _, _, level_table = _grid_tables(device)
    twice_x = torch.arange(_SEARCH_LOW, -_SEARCH_LOW + 1, device=device)
    return level_table[twice_x.clamp(_TWICE_LOW, _TWICE_HIGH) - _TWICE_LOW].contiguous()


class _SearchBuffers:
    """The [32, 16, n] temporaries of one search pass, allocated once and reused pass after pass."""

    def __init__(self, n: int, device: torch.device):
        shape = (SUB_BLOCK, 2 * N_TRY + 2, n)
        self.twice_scaled = torch.empty(shape, dtype=torch.float32, device=device)
        self.position = torch.empty(shape, dtype=torch.int32, device=device)
        self.q = torch.empty(shape, dtype=torch.float32, device=device)
        self.wq = torch.empty(shape, dtype=torch.float32, device=device)
        # (w·q)·x and (w·q)·q side by side, so one element-by-element sum accumulates both
        self.terms = torch.empty((SUB_BLOCK, 2) + shape[1:], dtype=torch.float32, device=device)
        self.term_rows = self.terms.unbind(0)  # views made once: the sums below index them 31 times a pass


def _candidate_sums(x_t: torch.Tensor, weight_t: torch.Tensor, twice_inverse: torch.Tensor,
                    buffers: _SearchBuffers, sums: torch.Tensor) -> None:
    """Σ w·q·x and Σ w·q² of every candidate scale into ``sums`` ``[2, 16, n]``, as the C loops accumulate.

    ``x_t``, ``weight_t``: ``[32, n]``; ``twice_inverse``: ``[16, n]``, twice each candidate's inverse scale.
    """
    level_table = _search_level_table(x_t.device)
    # x·(2·id) equals 2·(x·id) exactly: the doubled scaled value whose floor picks the level (best_index_int8)
    twice_scaled = torch.mul(x_t[:, None, :], twice_inverse[None, :, :], out=buffers.twice_scaled)
    buffers.position.copy_(twice_scaled.floor_().sub_(_SEARCH_LOW))
    q = torch.index_select(level_table, 0, buffers.position.view(-1), out=buffers.q.view(-1)).view(buffers.q.shape)
    wq = torch.mul(weight_t[:, None, :], q, out=buffers.wq)  # ggml's order: (w*q)*x and (w*q)*q
    torch.mul(wq, x_t[:, None, :], out=buffers.terms[:, 0])
    torch.mul(wq, q, out=buffers.terms[:, 1])
    sums.copy_(buffers.term_rows[0])
    for row in buffers.term_rows[1:]:
        sums.add_(row)


def _best_scales(sum_qx: torch.Tensor, sum_q2: torch.Tensor) -> torch.Tensor:
    """quantize_row_iq4_nl_impl's choice among the candidates ``[16, n]``: the first guess sets the bar and a
    later candidate replaces it only when strictly better, ``sumqx² > best·sumq2``; returns d = sumqx/sumq2."""
    has_q2 = sum_q2 > 0
    scale = torch.where(has_q2[0], sum_qx[0] / sum_q2[0], torch.zeros_like(sum_qx[0]))
    best = scale * sum_qx[0]
    for c in range(1, sum_qx.shape[0]):
        better = has_q2[c] & (sum_qx[c] * sum_qx[c] > best * sum_q2[c])
        scale = torch.where(better, sum_qx[c] / sum_q2[c], scale)
        best = torch.where(better, scale * sum_qx[c], best)
    return scale


def _first_largest_magnitude(x_t: torch.Tensor) -> torch.Tensor:
    """Per column of ``x_t`` ``[32, n]``, the value of largest |x|, the first one on ties (``if (ax > amax)``).

    Only its sign needs the position: the largest of rank·2 + (x > 0) over the maxima, rank = 32 - position,
    names the first maximum and carries its sign (cheaper than argmax over the leading dimension).
    """
    magnitude = x_t.abs()
    amax = magnitude.amax(dim=0)
    rank = torch.arange(2 * x_t.shape[0], 0, -2, dtype=torch.int32, device=x_t.device)[:, None]
    key = (magnitude == amax).to(torch.int32).mul_(rank).add_((x_t > 0).to(torch.int32))
    positive = key.amax(dim=0) % 2 == 1
    return torch.where(positive, amax, -amax)


def _sub_block_weights(x: torch.Tensor, importance: torch.Tensor | None, super_block: int) -> torch.Tensor:
    """quantize_row_iq4_nl_impl's weights: x² without importance, else qw·sqrt(sigma2 + x²) with
    sigma2 = 2/super_block · Σx² over the super-block. ``x`` is ``[n_super, super_block]``."""
    if importance is None:
        return x * x
    sigma2 = search.sequential_sum_rows((x * x).t(), from_zero=False) * (2.0 / super_block)
    return importance * _sqrt_float32(sigma2[:, None] + x * x)


def iq4_sub_block_scales(x: torch.Tensor, importance: torch.Tensor | None, super_block: int) -> torch.Tensor:
    """Scales ``[n_super, super_block/32]`` of every 32-weight sub-block of ``x`` ``[n_super, super_block]``,
    as quantize_row_iq4_nl_impl's search with ntry = 7 (0 for near-zero sub-blocks)."""
    n_super = x.shape[0]
    weight = _sub_block_weights(x, importance, super_block)
    x_t = x.reshape(-1, SUB_BLOCK).t().contiguous()  # [32, n_sub]: the sums run over contiguous rows
    weight_t = weight.reshape(-1, SUB_BLOCK).t().contiguous()
    n_sub = x_t.shape[1]
    signed_max = _first_largest_magnitude(x_t)
    near_zero = signed_max.abs() < GROUP_MAX_EPS
    # near-zero sub-blocks get scale 0 below; searching them with max = 1 keeps every index in range
    signed_max = torch.where(near_zero, torch.ones_like(signed_max), signed_max)
    # candidate inverse scales: 1/d with d = -max/values[0], then (itry + values[0])/max for itry in [-ntry, ntry]
    first_guess = 1.0 / (-signed_max / float(IQ4_LEVELS[0]))
    tries = torch.arange(-N_TRY, N_TRY + 1, dtype=torch.float32, device=x.device) + IQ4_LEVELS[0]
    twice_inverse = torch.cat([first_guess[None, :], tries[:, None] / signed_max[None, :]], dim=0).mul_(2)
    sums = torch.empty(2, twice_inverse.shape[0], n_sub, dtype=torch.float32, device=x.device)
    per_pass = min(n_sub, _SUB_BLOCKS_PER_PASS.get(x.device.type, _SUB_BLOCKS_PER_PASS_OTHER))
    buffers = _SearchBuffers(per_pass, x.device)
    for start in range(0, n_sub, per_pass):
        stop = min(n_sub, start + per_pass)
        if stop - start < per_pass:
            buffers = _SearchBuffers(stop - start, x.device)
        _candidate_sums(x_t[:, start:stop], weight_t[:, start:stop], twice_inverse[:, start:stop], buffers,
                        sums[:, :, start:stop])
    scales = _best_scales(sums[0], sums[1])
    return torch.where(near_zero, torch.zeros_like(scales), scales).view(n_super, super_block // SUB_BLOCK)


def _pack_nibbles(indices: torch.Tensor) -> torch.Tensor:
    """Level indices uint8 ``[n, 32·k]`` → ``[n, 16·k]`` bytes: per 32 weights, byte j = L[j] | L[16 + j] << 4."""
    grouped = indices.view(indices.shape[0], -1, 2, 16)
    return (grouped[:, :, 0] | (grouped[:, :, 1] << 4)).reshape(indices.shape[0], -1)


def _unpack_levels(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of _pack_nibbles: ``[n, 16·k]`` bytes → level values float32 ``[n, 32·k]``."""
    levels, _, _ = _grid_tables(packed.device)
    grouped = packed.view(packed.shape[0], -1, 1, 16)
    indices = torch.cat([grouped & 0x0F, grouped >> 4], dim=2).reshape(packed.shape[0], -1)
    return levels[indices.long()]


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """float32 ``[n]`` → ggml_half little-endian bytes ``[n, 2]``."""
    return _fp32_to_fp16(values).contiguous().view(torch.uint8).view(-1, 2)


def _fp16_from_bytes(data: torch.Tensor) -> torch.Tensor:
    return data.contiguous().view(torch.float16).to(torch.float32).view(-1)


class IQ4_NL(BlockFormat):
    """4.5 bpw: an fp16 scale per 32 weights on the non-linear grid (ggml's quantize_iq4_nl)."""

    name = "IQ4_NL"
    block_size = 32
    bytes_per_block = 18
    needs_imatrix = True

    def quantize_blocks(self, blocks: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        scale = iq4_sub_block_scales(blocks, importance, SUB_BLOCK)[:, 0]
        # with ntry > 0 the levels are searched again with the float scale: id = scale ? 1/scale : 0
        inverse = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
        indices = nearest_level_index(blocks * inverse[:, None])
        return torch.cat([_fp16_bytes(scale), _pack_nibbles(indices)], dim=1)

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        scale = _fp16_from_bytes(data[:, :2])
        return scale[:, None] * _unpack_levels(data[:, 2:])


class IQ4_XS(BlockFormat):
    """4.25 bpw: 256-weight super-blocks, an fp16 scale and a 6-bit scale per 32 weights (ggml's quantize_iq4_xs).

    Bytes: d (fp16) | scales_h (uint16, 2 high bits per sub-block) | scales_l (4 bits per sub-block) | qs.
    """

    name = "IQ4_XS"
    block_size = 256
    bytes_per_block = 136
    needs_imatrix = True

    def quantize_blocks(self, blocks: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        n = blocks.shape[0]
        scales = iq4_sub_block_scales(blocks, importance, self.block_size)  # [n, 8]
        # the scale of largest magnitude, the first on ties (NaN never wins a strict comparison)
        magnitude = torch.nan_to_num(scales.abs(), nan=0.0)
        first = magnitude.argmax(dim=1, keepdim=True)
        max_scale = torch.where(magnitude.gather(1, first)[:, 0] > 0, scales.gather(1, first)[:, 0],
                                torch.zeros(n, device=blocks.device))
        super_scale = -max_scale / 32
        inverse = torch.where(super_scale != 0, 1.0 / super_scale, torch.zeros_like(super_scale))
        sub_scales = _nearest_int(inverse[:, None] * scales).clamp_(-32, 31)  # int32 [n, 8]
        sub_d = super_scale[:, None] * sub_scales.to(torch.float32)
        sub_inverse = torch.where(sub_d != 0, 1.0 / sub_d, torch.zeros_like(sub_d))
        x = blocks.view(n, -1, SUB_BLOCK)
        indices = nearest_level_index(x * sub_inverse[:, :, None]).view(n, -1)
        stored = (sub_scales + 32).to(torch.uint8)  # 0..63
        low = stored & 0x0F
        scales_l = low[:, 0::2] | (low[:, 1::2] << 4)  # [n, 4]
        high = (stored >> 4).view(n, 2, 4)  # 2 bits per sub-block: byte 0 holds sub-blocks 0-3, byte 1 4-7
        scales_h = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
        return torch.cat([_fp16_bytes(super_scale), scales_h, scales_l, _pack_nibbles(indices)], dim=1)

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        n = data.shape[0]
        super_scale = _fp16_from_bytes(data[:, :2])
        high_bytes = data[:, 2:4].to(torch.int32)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=data.device)
        high = ((high_bytes[:, :, None] >> shifts) & 3).view(n, 8)
        low_bytes = data[:, 4:8].to(torch.int32)
        low = torch.stack([low_bytes & 0x0F, low_bytes >> 4], dim=2).view(n, 8)
        sub_scale = super_scale[:, None] * ((low | (high << 4)) - 32).to(torch.float32)
        levels = _unpack_levels(data[:, 8:]).view(n, 8, SUB_BLOCK)
        return (sub_scale[:, :, None] * levels).view(n, self.block_size)
