"""llama.cpp's 1- to 3-bit codebook i-quants: IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M.

IQ2/IQ3: each 256-weight super-block has an fp16 scale and a 4-bit scale per sub-block (16 or 32 weights); the
weights go by codewords of 8 (IQ2) or 4 (IQ3) magnitudes taken from a grid (``iq_grids``), and one sign per
weight (IQ2_XXS, IQ2_XS, IQ3_XXS store 7 signs per 8 weights, the 8th making their parity even). Their search is
ggml-quants.c's ``quantize_row_iq2_xxs_impl`` … ``quantize_row_iq3_s_impl``, one numba kernel for the five
(``_codebook_search``, configured by each format's ``CodebookSearch``) around the shared codeword search of
``search.codeword_scale_search``.

IQ1_S/IQ1_M: codewords of 8 levels -1/0/1, shifted by ±1/8, and 3-bit scales; ggml's exhaustive split of the
sorted weights (``quantize_row_iq1_s_impl``/``iq1_m_impl``), its misses on the grid resolved by the same
neighbour search (``search.nearest_neighbour_codeword``) as IQ2/IQ3. Everything in float32 in ggml's order, so
the bytes are ggml's.

``levels`` of these formats are one int32 per codeword, ``[n_blocks, 256 / width]``: the codeword index in the
low 16 bits, and above it the signs of its weights (bit 16 + i: weight i negative) or, for IQ1_M, the sign of
its shift (bit 16: -1/8). IQ1_S keeps its shift per 32 weights in the parameters (bit 3 of its 4-bit field).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from llmquant.formats.base import BlockFormat, fp16_tensor
from llmquant.formats.iq_grids import CodewordGrid, codeword_grid, sign_table
from llmquant.formats.legacy import fp16_bytes, fp16_from_bytes
from llmquant.formats.search import (
    FLT_MAX,
    GROUP_MAX_EPS,
    codeword_scale_search,
    f32,
    fp16_bits,
    inline_kernel,
    kernel,
    make_qp_quants,
    nearest_int,
    nearest_neighbour_codeword,
    sequential_sum_of_squares,
)

QK_K = 256
SIGN_GROUP = 8  # weights per sign byte
SIGN_SHIFT = 16  # a level's sign bits start here


@dataclass(frozen=True)
class CodebookSearch:
    """What distinguishes the five quantize_row_iq*_impl searches (ggml's constants, by name)."""

    grid: str  # iq_grids name
    sub_block: int  # weights per 4-bit scale
    max_level: int  # ggml's kMaxQ: levels 0 … kMaxQ - 1 per weight
    parity_signs: bool  # 7 stored signs per 8 weights: flip the least important one to make the count even
    sigma2_factor: float  # sigma2 = factor · Σx² / QK_K
    plain_sigma_share: float | None  # weights without an imatrix: share·sigma2 + x² (None: ggml requires one)
    group_max_eps: float  # a sub-block below this maximum magnitude is stored as zero (0: only exact zeros)
    start_from_qp: bool  # IQ2_XXS: the first scale from make_qp_quants, candidates around its largest level
    n_steps: int  # candidates is = -n_steps … n_steps
    step: float  # inverse scale (2·kMaxQ - 1 + is·step)/max
    on_grid_start: bool  # IQ3_S counts every codeword off the grid until a candidate fits
    recompute_always: bool  # IQ2_XXS re-rounds under the kept scale even when every codeword was on the grid
    recompute_all: bool  # re-round every codeword, not only those that were off the grid
    scale_fudge: float  # the stored super-block scale is (max scale / 31)·fudge
    # IQ2_S, IQ3_S write into the block as they go: a block whose scales all come out 0 keeps its codewords
    clear_unscaled_block: bool = True
    # IQ3_S advances its codeword and sign bytes only past sub-blocks it searched, so a skipped (all-zero)
    # sub-block's slots hold the next ones' low bytes and signs (the high index bits stay in place)
    compact_skipped: bool = False


@kernel
def _codebook_search(x, importance, has_importance, sub_block, parity_signs, sigma2_factor, plain_sigma_share,
                     group_max_eps, start_from_qp, n_steps, step, max_level, bits, index_map, neighbours,
                     grid_values, grid_levels, on_grid_start, recompute_always, recompute_all, scale_fudge,
                     clear_unscaled_block, compact_skipped, super_scale_bits, sub_scales, levels):
    n_blocks = x.shape[0]
    width = grid_levels.shape[1]
    n_sub = QK_K // sub_block
    per_sub = sub_block // width
    weight = np.empty(sub_block, dtype=np.float32)
    waux = np.empty(sub_block, dtype=np.float32)
    xval = np.empty(sub_block, dtype=np.float32)
    block_levels = np.empty(sub_block, dtype=np.int32)
    trial = np.empty(sub_block, dtype=np.int32)
    on_grid = np.empty(sub_block // width, dtype=np.bool_)
    trial_on_grid = np.empty(sub_block // width, dtype=np.bool_)
    qp_levels = np.empty(sub_block, dtype=np.uint8)
    signs = np.empty(sub_block // SIGN_GROUP, dtype=np.int32)
    scales = np.empty(n_sub, dtype=np.float32)
    sign_mask = 127 if parity_signs else 255
    n_codewords = QK_K // width
    low_bytes = np.empty(n_codewords, dtype=np.int32)  # ggml's bytes as it writes them: index low 8 bits,
    high_bits = np.empty(n_codewords, dtype=np.int32)  # the bits above, and the sign byte of each 8 weights
    sign_bytes = np.empty(QK_K // SIGN_GROUP, dtype=np.int32)
    for b in range(n_blocks):
        low_bytes[:] = 0
        high_bits[:] = 0
        sign_bytes[:] = 0
        slot = 0
        xbl = x[b]
        sigma2 = f32(sigma2_factor) * sequential_sum_of_squares(xbl) / f32(QK_K)
        max_scale = f32(0.0)
        for ib in range(n_sub):
            xb = xbl[ib * sub_block:(ib + 1) * sub_block]
            for i in range(sub_block):
                if has_importance:
                    weight[i] = importance[b, ib * sub_block + i] * np.sqrt(sigma2 + xb[i] * xb[i])
                elif plain_sigma_share == 0:
                    weight[i] = xb[i] * xb[i]
                else:
                    weight[i] = f32(plain_sigma_share) * sigma2 + xb[i] * xb[i]
                waux[i] = np.sqrt(weight[i])
            for k in range(sub_block // SIGN_GROUP):
                n_flip = 0
                s = 0
                for i in range(SIGN_GROUP * k, SIGN_GROUP * (k + 1)):
                    if xb[i] >= 0:
                        xval[i] = xb[i]
                    else:
                        xval[i] = -xb[i]
                        n_flip += 1
                        s |= 1 << (i - SIGN_GROUP * k)
                if parity_signs and n_flip % 2:
                    # an odd count cannot be stored: flip the weight that matters least (the first of equals)
                    least = SIGN_GROUP * k
                    least_error = weight[least] * xb[least] * xb[least]
                    for i in range(SIGN_GROUP * k + 1, SIGN_GROUP * (k + 1)):
                        error = weight[i] * xb[i] * xb[i]
                        if error < least_error:
                            least_error = error
                            least = i
                    xval[least] = -xval[least]
                    s ^= 1 << (least - SIGN_GROUP * k)
                signs[k] = s
            largest = xval[0]
            for i in range(1, sub_block):
                largest = largest if largest > xval[i] else xval[i]
            scales[ib] = f32(0.0)
            if largest < f32(group_max_eps) or largest == 0:
                continue
            if start_from_qp:
                scale = make_qp_quants(xval, weight, qp_levels, max_level + 1)
                reference = scale * f32(max_level)
                if reference <= 0:
                    continue
            else:
                reference = largest
                scale = largest / f32(2 * max_level - 1)
            block_levels[:] = 0
            scale = codeword_scale_search(xval, weight, waux, reference, scale, n_steps, f32(step), max_level,
                                          bits, index_map, neighbours, grid_values, grid_levels, on_grid_start,
                                          recompute_always, recompute_all, block_levels, trial, on_grid,
                                          trial_on_grid)
            if scale < 0:  # ggml: "should never happen": store the flipped signs with a positive scale
                scale = -scale
                for k in range(sub_block // SIGN_GROUP):
                    signs[k] = ~signs[k] & sign_mask
            target = slot if compact_skipped else ib
            for k in range(per_sub):
                pattern = 0
                for i in range(width):
                    pattern |= block_levels[width * k + i] << (bits * i)
                index = index_map[pattern]
                low_bytes[target * per_sub + k] = index & 255
                high_bits[ib * per_sub + k] = index >> 8
            for k in range(sub_block // SIGN_GROUP):
                stored = signs[k] & sign_mask
                if parity_signs:  # the 8th sign as the dequantizer's ksigns table restores it: even parity
                    parity = 0
                    for i in range(7):
                        parity ^= (stored >> i) & 1
                    stored |= parity << 7
                sign_bytes[target * (sub_block // SIGN_GROUP) + k] = stored
            slot += 1
            scales[ib] = scale
            max_scale = max_scale if max_scale > scale else scale
        super_scale_bits[b] = 0
        for ib in range(n_sub):
            sub_scales[b, ib] = 0
        if max_scale == 0 and clear_unscaled_block:
            low_bytes[:] = 0
            high_bits[:] = 0
            sign_bytes[:] = 0
        for c in range(n_codewords):
            first = width * c
            sign_bits = (sign_bytes[first // SIGN_GROUP] >> (first % SIGN_GROUP)) & ((1 << width) - 1)
            levels[b, c] = low_bytes[c] | (high_bits[c] << 8) | (sign_bits << SIGN_SHIFT)
        if max_scale == 0:
            continue
        d = max_scale / f32(31.0)
        super_scale_bits[b] = fp16_bits(d * f32(scale_fudge))
        inverse = f32(1.0) / d
        for ib in range(n_sub):
            sub_scales[b, ib] = max(0, min(15, nearest_int(f32(0.5) * (inverse * scales[ib] - f32(1.0)))))


def _sign_bytes(levels: torch.Tensor, width: int) -> torch.Tensor:
    """Per 8 weights the sign byte (bit i: weight i negative) from the levels' sign bits → uint8 [n, 32]."""
    bits = (levels >> SIGN_SHIFT) & ((1 << width) - 1)
    if width == SIGN_GROUP:
        return bits.to(torch.uint8)
    pairs = bits.reshape(levels.shape[0], -1, 2)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << width)).to(torch.uint8)


def _levels_from(indices: torch.Tensor, sign_bytes: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of _sign_bytes, with the codeword indices: int32 [n, 256 / width]."""
    signs = sign_bytes.to(torch.int32)
    if width == 4:
        signs = torch.stack([signs & 15, signs >> 4], dim=2).reshape(signs.shape[0], -1)
    return indices.to(torch.int32) | (signs << SIGN_SHIFT)


def _bytes_of(words: torch.Tensor, n_bytes: int) -> torch.Tensor:
    """Little-endian bytes of int64 ``words`` [n, m] → uint8 [n, m·n_bytes]."""
    shifts = torch.arange(0, 8 * n_bytes, 8, device=words.device)
    return ((words[:, :, None] >> shifts) & 255).to(torch.uint8).reshape(words.shape[0], -1)


def _words_of(data: torch.Tensor, n_bytes: int) -> torch.Tensor:
    """Inverse of _bytes_of: uint8 [n, m·n_bytes] → int64 [n, m]."""
    grouped = data.to(torch.int64).reshape(data.shape[0], -1, n_bytes)
    shifts = torch.arange(0, 8 * n_bytes, 8, device=data.device)
    return (grouped << shifts).sum(dim=2)


class CodebookParams(NamedTuple):
    """The stored parameters: weight = super_scale·f(sub_scale)·grid value·sign (f as the format's dequantizer)."""

    super_scale: torch.Tensor  # float16 [n_blocks]: ggml's d
    sub_scales: torch.Tensor  # uint8 [n_blocks, n_sub]: the 4-bit scales 0 … 15


class CodebookGrid(NamedTuple):
    """What each level means under fixed parameters: weight = ``scale[codeword]·values[index][i]·sign``."""

    scale: torch.Tensor  # float32 [n_blocks, n_codewords]
    values: torch.Tensor  # float32 [n_grid, width]: the dequantizer's grid values

    def weights(self, levels: torch.Tensor) -> torch.Tensor:
        """The weights ``[n_blocks, n_codewords·width]`` that the codeword levels stand for."""
        levels = levels.to(torch.int64)
        width = self.values.shape[1]
        magnitude = self.scale[:, :, None] * self.values[levels & 0xFFFF]
        negative = ((levels[:, :, None] >> (SIGN_SHIFT + torch.arange(width, device=levels.device))) & 1) == 1
        return torch.where(negative, -magnitude, magnitude).reshape(levels.shape[0], -1)


class CodebookFormat(BlockFormat):
    """The shared steps of the five formats; a subclass sets ``searcher`` and its byte layout."""

    block_size = QK_K
    needs_imatrix = True
    levels_from_search = "ggml's codewords come from its scale search (and its neighbour lists), not re-rounded"
    Params = CodebookParams
    searcher: CodebookSearch
    sub_scale_offset: float  # dequantizer: d·(offset + sub_scale)·factor
    sub_scale_factor: float

    @property
    def grid(self) -> CodewordGrid:
        return codeword_grid(self.searcher.grid)

    @property
    def width(self) -> int:
        return self.grid.width

    def search(self, blocks, importance, row_sigma2):
        config = self.searcher
        if importance is None and config.plain_sigma_share is None:
            raise ValueError(f"{self.name} needs an importance vector (ggml refuses to quantize it without one): "
                             f"give an imatrix (--imatrix FILE, or --calib TEXT to compute one)")
        grid = self.grid
        n = blocks.shape[0]
        super_scale_bits = np.empty(n, dtype=np.uint16)
        sub_scales = np.empty((n, QK_K // config.sub_block), dtype=np.uint8)
        levels = np.empty((n, QK_K // grid.width), dtype=np.int32)
        has_importance = importance is not None
        weights = importance if has_importance else np.empty((0, QK_K), dtype=np.float32)
        _codebook_search(blocks, weights, has_importance, config.sub_block, config.parity_signs,
                         config.sigma2_factor, config.plain_sigma_share or 0.0, config.group_max_eps,
                         config.start_from_qp, config.n_steps, config.step, config.max_level, grid.bits,
                         grid.index_map, grid.neighbours, grid.odd_positions, grid.levels, config.on_grid_start,
                         config.recompute_always, config.recompute_all, config.scale_fudge,
                         config.clear_unscaled_block, config.compact_skipped, super_scale_bits, sub_scales, levels)
        return (fp16_tensor(super_scale_bits), sub_scales), levels

    def sub_block_scales(self, params: CodebookParams) -> torch.Tensor:
        """float32 [n_blocks, n_sub] as gguf's dequantizer computes them: d·(offset + ls)·factor."""
        d = params.super_scale.to(torch.float32)[:, None]
        ls = params.sub_scales.to(torch.float32)
        return d * (self.sub_scale_offset + ls) * self.sub_scale_factor

    def reconstruct(self, params: CodebookParams) -> CodebookGrid:
        per_sub = self.searcher.sub_block // self.width
        scale = self.sub_block_scales(params).repeat_interleave(per_sub, dim=1)
        values = torch.from_numpy(self.grid.values.astype(np.float32)).to(scale.device)
        return CodebookGrid(scale, values)

    def encode(self, values, params: CodebookParams, columns=None) -> torch.Tensor:
        """The nearest signed codeword of each codeword's weights under fixed ``params``: signs from the
        weights (for the parity formats the smallest weight of an odd group flipped), then the codeword of
        least squared error. ``columns``: None, or a slice of whole sign groups (8 weights)."""
        values = values if isinstance(values, torch.Tensor) else torch.from_numpy(np.asarray(values, np.float32))
        start, stop = 0, QK_K
        if columns is not None:
            if not isinstance(columns, slice) or (columns.step or 1) != 1:
                raise ValueError(f"{self.name}: encode takes a slice of whole groups of {SIGN_GROUP} weights")
            start, stop, _ = columns.indices(QK_K)
            if start % SIGN_GROUP or stop % SIGN_GROUP:
                raise ValueError(f"{self.name}: encode takes a slice of whole groups of {SIGN_GROUP} weights")
        grid = self.reconstruct(params)
        width = self.width
        scale = grid.scale[:, start // width:stop // width]
        x = np.ascontiguousarray(values.detach().to("cpu", torch.float32).numpy())
        levels = np.empty((x.shape[0], (stop - start) // width), dtype=np.int32)
        _nearest_codewords(x, np.ascontiguousarray(scale.cpu().numpy()), grid.values.cpu().numpy(),
                           self.searcher.parity_signs, levels)
        return torch.from_numpy(levels).to(params.super_scale.device)

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        levels, params = self.unpack(data)
        return self.reconstruct(params).weights(levels)


@inline_kernel
def _best_codeword(scale, values, magnitude, first):
    """(index, squared error) of the grid entry nearest to ``magnitude[first:first + width]`` under ``scale``."""
    best = 0
    best_error = np.inf
    for j in range(values.shape[0]):
        error = 0.0
        for i in range(values.shape[1]):
            diff = scale * values[j, i] - magnitude[first + i]
            error += diff * diff
        if error < best_error:
            best_error = error
            best = j
    return best, best_error


@kernel
def _nearest_codewords(x, scale, values, parity_signs, levels):
    """encode's kernel: per 8 weights their signs, per codeword the grid entry of least Σ(scale·v - |x|)². Where
    an odd count of signs cannot be stored (parity formats), every weight's sign is tried flipped and the flip
    of least total error kept."""
    width = values.shape[1]
    per_group = SIGN_GROUP // width
    magnitude = np.empty(SIGN_GROUP, dtype=np.float64)
    index = np.empty(per_group, dtype=np.int64)
    error = np.empty(per_group, dtype=np.float64)
    for b in range(x.shape[0]):
        for g in range(x.shape[1] // SIGN_GROUP):
            s = 0
            for i in range(SIGN_GROUP):
                v = x[b, SIGN_GROUP * g + i]
                magnitude[i] = abs(v)
                if v < 0:
                    s ^= 1 << i
            for k in range(per_group):
                index[k], error[k] = _best_codeword(scale[b, g * per_group + k], values, magnitude, width * k)
            odd = 0
            for i in range(SIGN_GROUP):
                odd ^= (s >> i) & 1
            if parity_signs and odd:
                best_total = np.inf
                best_flip = 0
                best_index = 0
                for f in range(SIGN_GROUP):
                    k = f // width
                    magnitude[f] = -magnitude[f]
                    flipped, flipped_error = _best_codeword(scale[b, g * per_group + k], values, magnitude, width * k)
                    magnitude[f] = -magnitude[f]
                    total = flipped_error
                    for other in range(per_group):
                        if other != k:
                            total += error[other]
                    if total < best_total:
                        best_total = total
                        best_flip = f
                        best_index = flipped
                s ^= 1 << best_flip
                index[best_flip // width] = best_index
            for k in range(per_group):
                signs = (s >> (width * k)) & ((1 << width) - 1)
                levels[b, g * per_group + k] = index[k] | (signs << SIGN_SHIFT)


# ==== IQ2_XXS ====


class IQ2_XXS(CodebookFormat):
    """2.06 bpw: per 32 weights 4 codewords of 8 from a 256-entry grid, 7-bit signs and a 4-bit scale.

    Bytes: d (fp16) | per 32 weights two uint32: the 4 codeword indices (a byte each); 4 × 7 sign bits | scale << 28.
    """

    name = "IQ2_XXS"
    weights_per_level = 8
    bytes_per_block = 66
    searcher = CodebookSearch(
        grid="iq2xxs", sub_block=32, max_level=3, parity_signs=True, sigma2_factor=1.0, plain_sigma_share=None,
        group_max_eps=float(GROUP_MAX_EPS), start_from_qp=True, n_steps=6, step=0.1, on_grid_start=True,
        recompute_always=True, recompute_all=True, scale_fudge=1.0)
    sub_scale_offset, sub_scale_factor = 0.5, 0.25

    def pack(self, levels: torch.Tensor, params: CodebookParams) -> torch.Tensor:
        n = levels.shape[0]
        indices = (levels & 0xFFFF).to(torch.int64).reshape(n, 8, 4)
        grid_word = (indices << torch.tensor([0, 8, 16, 24], device=levels.device)).sum(dim=2)
        signs = (_sign_bytes(levels, 8).to(torch.int64) & 127).reshape(n, 8, 4)
        sign_word = (signs << torch.tensor([0, 7, 14, 21], device=levels.device)).sum(dim=2)
        sign_word = sign_word | (params.sub_scales.to(torch.int64) << 28)
        words = torch.stack([grid_word, sign_word], dim=2).reshape(n, 16)
        return torch.cat([fp16_bytes(params.super_scale), _bytes_of(words, 4)], dim=1)

    def unpack(self, data: torch.Tensor) -> tuple[torch.Tensor, CodebookParams]:
        n = data.shape[0]
        words = _words_of(data[:, 2:], 4).reshape(n, 8, 2)
        indices = (words[:, :, 0:1] >> torch.tensor([0, 8, 16, 24], device=data.device)) & 255
        seven = (words[:, :, 1:2] >> torch.tensor([0, 7, 14, 21], device=data.device)) & 127
        ksigns = torch.from_numpy(sign_table().astype(np.int64)).to(data.device)
        levels = _levels_from(indices.reshape(n, 32), ksigns[seven.reshape(n, 32)], 8)
        sub_scales = (words[:, :, 1] >> 28).to(torch.uint8)
        return levels, CodebookParams(fp16_from_bytes(data[:, :2]), sub_scales)


# ==== IQ2_XS ====


class IQ2_XS(CodebookFormat):
    """2.31 bpw: per 16 weights 2 codewords of 8 from a 512-entry grid, 7-bit signs and a 4-bit scale.

    Bytes: d (fp16) | 32 uint16: codeword index (9 bits) | 7 sign bits << 9 | 8 bytes of two 4-bit scales.
    """

    name = "IQ2_XS"
    weights_per_level = 8
    bytes_per_block = 74
    searcher = CodebookSearch(
        grid="iq2xs", sub_block=16, max_level=3, parity_signs=True, sigma2_factor=1.0, plain_sigma_share=None,
        group_max_eps=float(GROUP_MAX_EPS), start_from_qp=False, n_steps=9, step=0.1, on_grid_start=True,
        recompute_always=False, recompute_all=False, scale_fudge=1.0)
    sub_scale_offset, sub_scale_factor = 0.5, 0.25

    def pack(self, levels: torch.Tensor, params: CodebookParams) -> torch.Tensor:
        signs = _sign_bytes(levels, 8).to(torch.int64) & 127
        words = (levels & 0xFFFF).to(torch.int64) | (signs << 9)
        return torch.cat([fp16_bytes(params.super_scale), _bytes_of(words, 2), _pack_scale_nibbles(params)], dim=1)

    def unpack(self, data: torch.Tensor) -> tuple[torch.Tensor, CodebookParams]:
        words = _words_of(data[:, 2:66], 2)
        ksigns = torch.from_numpy(sign_table().astype(np.int64)).to(data.device)
        levels = _levels_from(words & 511, ksigns[words >> 9], 8)
        return levels, CodebookParams(fp16_from_bytes(data[:, :2]), _unpack_scale_nibbles(data[:, 66:74]))


def _pack_scale_nibbles(params: CodebookParams) -> torch.Tensor:
    stored = params.sub_scales.to(torch.uint8)
    return stored[:, 0::2] | (stored[:, 1::2] << 4)


def _unpack_scale_nibbles(data: torch.Tensor) -> torch.Tensor:
    return torch.stack([data & 15, data >> 4], dim=2).reshape(data.shape[0], -1)


# ==== IQ2_S ====


class IQ2_S(CodebookFormat):
    """2.56 bpw: per 16 weights 2 codewords of 8 from a 1024-entry grid, 8 sign bits each and a 4-bit scale.

    Bytes: d (fp16) | 32 low bytes of the indices | 32 sign bytes | 8 bytes of 2 high index bits × 4 | 8 scale bytes.
    """

    name = "IQ2_S"
    weights_per_level = 8
    bytes_per_block = 82
    searcher = CodebookSearch(
        grid="iq2s", sub_block=16, max_level=3, parity_signs=False, sigma2_factor=2.0, plain_sigma_share=0.25,
        group_max_eps=1e-8, start_from_qp=False, n_steps=9, step=0.1, on_grid_start=True,
        recompute_always=False, recompute_all=False, scale_fudge=0.9875, clear_unscaled_block=False)
    sub_scale_offset, sub_scale_factor = 0.5, 0.25

    def pack(self, levels: torch.Tensor, params: CodebookParams) -> torch.Tensor:
        n = levels.shape[0]
        indices = (levels & 0xFFFF).to(torch.int64)
        high = (indices >> 8).reshape(n, 8, 4) << torch.tensor([0, 2, 4, 6], device=levels.device)
        return torch.cat([fp16_bytes(params.super_scale), (indices & 255).to(torch.uint8), _sign_bytes(levels, 8),
                          high.sum(dim=2).to(torch.uint8), _pack_scale_nibbles(params)], dim=1)

    def unpack(self, data: torch.Tensor) -> tuple[torch.Tensor, CodebookParams]:
        n = data.shape[0]
        high = (data[:, 66:74, None].to(torch.int64) >> torch.tensor([0, 2, 4, 6], device=data.device)) & 3
        indices = data[:, 2:34].to(torch.int64) | (high.reshape(n, 32) << 8)
        levels = _levels_from(indices, data[:, 34:66], 8)
        return levels, CodebookParams(fp16_from_bytes(data[:, :2]), _unpack_scale_nibbles(data[:, 74:82]))


# ==== IQ3_XXS ====


class IQ3_XXS(CodebookFormat):
    """3.06 bpw: per 32 weights 8 codewords of 4 from a 256-entry grid, 7-bit signs per 8 and a 4-bit scale.

    Bytes: d (fp16) | 64 codeword indices | per 32 weights a uint32: 4 × 7 sign bits | scale << 28.
    """

    name = "IQ3_XXS"
    weights_per_level = 4
    bytes_per_block = 98
    searcher = CodebookSearch(
        grid="iq3xxs", sub_block=32, max_level=8, parity_signs=True, sigma2_factor=2.0, plain_sigma_share=0.0,
        group_max_eps=1e-8, start_from_qp=False, n_steps=15, step=0.2, on_grid_start=True,
        recompute_always=False, recompute_all=False, scale_fudge=1.0125)
    sub_scale_offset, sub_scale_factor = 0.5, 0.5

    def pack(self, levels: torch.Tensor, params: CodebookParams) -> torch.Tensor:
        n = levels.shape[0]
        signs = (_sign_bytes(levels, 4).to(torch.int64) & 127).reshape(n, 8, 4)
        words = (signs << torch.tensor([0, 7, 14, 21], device=levels.device)).sum(dim=2)
        words = words | (params.sub_scales.to(torch.int64) << 28)
        return torch.cat([fp16_bytes(params.super_scale), (levels & 255).to(torch.uint8), _bytes_of(words, 4)], dim=1)

    def unpack(self, data: torch.Tensor) -> tuple[torch.Tensor, CodebookParams]:
        n = data.shape[0]
        words = _words_of(data[:, 66:98], 4)
        seven = (words[:, :, None] >> torch.tensor([0, 7, 14, 21], device=data.device)) & 127
        ksigns = torch.from_numpy(sign_table().astype(np.int64)).to(data.device)
        levels = _levels_from(data[:, 2:66], ksigns[seven.reshape(n, 32)], 4)
        return levels, CodebookParams(fp16_from_bytes(data[:, :2]), (words >> 28).to(torch.uint8))


# ==== IQ3_S ====


class IQ3_S(CodebookFormat):
    """3.44 bpw: per 32 weights 8 codewords of 4 from a 512-entry grid, 8 sign bits per 8, a 4-bit scale.

    Bytes: d (fp16) | 64 low index bytes | 8 bytes of high index bits | 32 sign bytes | 4 bytes of two scales.
    """

    name = "IQ3_S"
    weights_per_level = 4
    bytes_per_block = 110
    searcher = CodebookSearch(
        grid="iq3s", sub_block=32, max_level=8, parity_signs=False, sigma2_factor=2.0, plain_sigma_share=0.0,
        group_max_eps=0.0, start_from_qp=False, n_steps=9, step=0.2, on_grid_start=False,
        recompute_always=False, recompute_all=True, scale_fudge=1.033, clear_unscaled_block=False,
        compact_skipped=True)
    sub_scale_offset, sub_scale_factor = 1.0, 2.0  # dequantize_row_iq3_s: d·(1 + 2·ls)

    def sub_block_scales(self, params: CodebookParams) -> torch.Tensor:
        d = params.super_scale.to(torch.float32)[:, None]
        return d * (1 + 2 * params.sub_scales.to(torch.int32)).to(torch.float32)

    def pack(self, levels: torch.Tensor, params: CodebookParams) -> torch.Tensor:
        n = levels.shape[0]
        indices = (levels & 0xFFFF).to(torch.int64)
        high = (indices >> 8).reshape(n, 8, 8) << torch.arange(8, device=levels.device)
        return torch.cat([fp16_bytes(params.super_scale), (indices & 255).to(torch.uint8),
                          high.sum(dim=2).to(torch.uint8), _sign_bytes(levels, 4),
                          _pack_scale_nibbles(params)], dim=1)

    def unpack(self, data: torch.Tensor) -> tuple[torch.Tensor, CodebookParams]:
        n = data.shape[0]
        high = (data[:, 66:74, None].to(torch.int64) >> torch.arange(8, device=data.device)) & 1
        indices = data[:, 2:66].to(torch.int64) | (high.reshape(n, 64) << 8)
        levels = _levels_from(indices, data[:, 74:106], 4)
        return levels, CodebookParams(fp16_from_bytes(data[:, :2]), _unpack_scale_nibbles(data[:, 106:110]))



# ==== IQ1_S, IQ1_M: codewords of -1/0/1 shifted by ±1/8, scales found by an exhaustive split ====

IQ1_DELTA = 0.125  # IQ1S_DELTA, IQ1M_DELTA
# x_p and x_m of quantize_row_iq1_s_impl/iq1_m_impl: the codeword levels 0, 1, 2 under a +delta and a -delta shift
_IQ1_SHIFTED = np.array([[-1 + IQ1_DELTA, IQ1_DELTA, 1 + IQ1_DELTA],
                         [-1 - IQ1_DELTA, -IQ1_DELTA, 1 - IQ1_DELTA]], dtype=np.float32)


@functools.cache
def _shifted_grids() -> np.ndarray:
    grid = codeword_grid("iq1s")
    return np.stack([grid.level_values(_IQ1_SHIFTED[0]), grid.level_values(_IQ1_SHIFTED[1])])


@inline_kernel
def _stable_order(x, order):
    """The indices of x in ascending order, equal values in their order: glibc's qsort (a merge sort) of
    ggml's (value, index) pairs."""
    for j in range(x.shape[0]):
        order[j] = j
        k = j
        while k > 0 and x[j] < x[order[k - 1]]:
            order[k] = order[k - 1]
            k -= 1
        order[k] = j


@inline_kernel
def _iq1_codewords(xb, weight, scale, shift_of, L, index_map, neighbours, shifted_grids, grid_levels, codewords):
    """The codewords of one sub-block's split levels ``L`` (on the grid, else the best neighbour under each
    codeword's shifted grid ``shifted_grids[shift_of[k]]``) and the scale refitted where one was off the grid."""
    all_on_grid = True
    for k in range(codewords.shape[0]):
        pattern = 0
        for j in range(8):
            pattern |= L[8 * k + j] << (2 * j)
        index = index_map[pattern]
        if index < 0:
            all_on_grid = False
            index = nearest_neighbour_codeword(neighbours, -index - 1, shifted_grids[shift_of[k]], grid_levels, xb,
                                               weight, 8 * k, scale, L)
        codewords[k] = index
    if not all_on_grid:
        sum_qx = f32(0.0)
        sum_q2 = f32(0.0)
        for k in range(codewords.shape[0]):
            for j in range(8):
                w = weight[8 * k + j]
                q = shifted_grids[shift_of[k], codewords[k], j]
                sum_qx += w * q * xb[8 * k + j]
                sum_q2 += w * q * q
        if sum_qx > 0 and sum_q2 > 0:
            scale = sum_qx / sum_q2
    return scale


@inline_kernel
def _iq1_weights(xb, qw, has_importance, sigma2, weight):
    for i in range(xb.shape[0]):
        weight[i] = qw[i] * np.sqrt(sigma2 + xb[i] * xb[i]) if has_importance else xb[i] * xb[i]


@inline_kernel
def _largest_magnitude(xb):
    largest = abs(xb[0])
    for i in range(1, xb.shape[0]):
        largest = largest if largest > abs(xb[i]) else abs(xb[i])
    return largest


@kernel
def _iq1_s_search(x, importance, shifted, index_map, neighbours, shifted_grids, grid_levels, super_scale_bits,
                  nibbles, levels):
    # quantize_row_iq1_s_impl: 32-weight sub-blocks, one shift per sub-block
    sub = 32
    weight = np.empty(sub, dtype=np.float32)
    order = np.empty(sub, dtype=np.int64)
    sum_x = np.empty(sub + 1, dtype=np.float32)
    sum_w = np.empty(sub + 1, dtype=np.float32)
    L = np.empty(sub, dtype=np.int32)
    codewords = np.empty(4, dtype=np.int32)
    shift_of = np.empty(4, dtype=np.int32)
    scales = np.empty(QK_K // sub, dtype=np.float32)
    shifts = np.empty(QK_K // sub, dtype=np.int32)
    for b in range(x.shape[0]):
        sigma2 = f32(2.0) * sequential_sum_of_squares(x[b]) / f32(QK_K)
        max_scale = f32(0.0)
        for ib in range(QK_K // sub):
            xb = x[b, sub * ib:sub * (ib + 1)]
            _iq1_weights(xb, importance[b, sub * ib:sub * (ib + 1)], True, sigma2, weight)
            for k in range(4):
                levels[b, 4 * ib + k] = 0
            scales[ib] = f32(0.0)
            shifts[ib] = 1
            if _largest_magnitude(xb) < f32(1e-12):  # GROUP_MAX_EPS_IQ1_S
                continue
            scale = _largest_magnitude(xb)
            _stable_order(xb, order)
            sum_x[0] = f32(0.0)
            sum_w[0] = f32(0.0)
            for j in range(sub):
                i = order[j]
                sum_x[j + 1] = sum_x[j] + weight[i] * xb[i]
                sum_w[j + 1] = sum_w[j] + weight[i]
            # the exact weighted fit of every split of the sorted weights into levels -1, 0, 1, either shift
            best_score = -FLT_MAX
            best1 = -1
            best2 = -1
            best_shift = 0
            for i1 in range(sub + 1):
                for i2 in range(i1, sub + 1):
                    for s in range(2):
                        xx = shifted[s]
                        sum_qx = ((sum_x[i1] - sum_x[0]) * xx[0] + (sum_x[i2] - sum_x[i1]) * xx[1]
                                  + (sum_x[sub] - sum_x[i2]) * xx[2])
                        sum_q2 = ((sum_w[i1] - sum_w[0]) * xx[0] * xx[0] + (sum_w[i2] - sum_w[i1]) * xx[1] * xx[1]
                                  + (sum_w[sub] - sum_w[i2]) * xx[2] * xx[2])
                        if sum_q2 > 0 and sum_qx * sum_qx > best_score * sum_q2:
                            scale = sum_qx / sum_q2
                            best_score = scale * sum_qx
                            best1 = i1
                            best2 = i2
                            best_shift = 1 - 2 * s
            if best1 < 0 or best2 < 0 or best_shift == 0:
                continue
            for j in range(sub):
                L[order[j]] = 0 if j < best1 else (1 if j < best2 else 2)
            if scale < 0:
                for j in range(sub):
                    L[j] = 2 - L[j]
                scale = -scale
                best_shift = -best_shift
            shift_of[:] = 0 if best_shift == 1 else 1
            scale = _iq1_codewords(xb, weight, scale, shift_of, L, index_map, neighbours, shifted_grids, grid_levels,
                                   codewords)
            for k in range(4):
                levels[b, 4 * ib + k] = codewords[k]
            scales[ib] = scale
            shifts[ib] = best_shift
            max_scale = max_scale if max_scale > scale else scale
        super_scale_bits[b] = 0
        for ib in range(QK_K // sub):
            nibbles[b, ib] = 0
        if max_scale == 0:
            continue
        d = max_scale / f32(15.0)
        super_scale_bits[b] = fp16_bits(d * f32(1.125))
        inverse = f32(1.0) / d
        for ib in range(QK_K // sub):
            level = max(0, min(7, nearest_int(f32(0.5) * (inverse * scales[ib] - f32(1.0)))))
            nibbles[b, ib] = level | (8 if shifts[ib] == -1 else 0)


@kernel
def _iq1_m_search(x, importance, has_importance, shifted, index_map, neighbours, shifted_grids, grid_levels,
                  super_scale_bits, sub_scales, levels):
    # quantize_row_iq1_m_impl: 16-weight sub-blocks, a shift per 8 weights, the super-block scale refitted
    sub = 16
    half = sub // 2
    weight = np.empty(sub, dtype=np.float32)
    order = np.empty(sub, dtype=np.int64)
    px = np.empty((2, sub + 1), dtype=np.float32)
    pw = np.empty((2, sub + 1), dtype=np.float32)
    sum_qx = np.empty(4, dtype=np.float32)
    sum_q2 = np.empty(4, dtype=np.float32)
    L = np.empty(sub, dtype=np.int32)
    codewords = np.empty(2, dtype=np.int32)
    shift_of = np.empty(2, dtype=np.int32)
    scales = np.empty(QK_K // sub, dtype=np.float32)
    shifts = np.empty(QK_K // sub, dtype=np.int32)
    x_p = shifted[0]
    x_m = shifted[1]
    p2 = x_p[2]
    m2 = x_m[2]
    cp1 = x_p[0] * x_p[0] - x_p[1] * x_p[1]
    cp2 = x_p[1] * x_p[1] - x_p[2] * x_p[2]
    cm1 = x_m[0] * x_m[0] - x_m[1] * x_m[1]
    cm2 = x_m[1] * x_m[1] - x_m[2] * x_m[2]
    for b in range(x.shape[0]):
        sigma2 = f32(2.0) * sequential_sum_of_squares(x[b]) / f32(QK_K)
        max_scale = f32(0.0)
        for ib in range(QK_K // sub):
            xb = x[b, sub * ib:sub * (ib + 1)]
            qw = importance[b, sub * ib:sub * (ib + 1)] if has_importance else xb
            _iq1_weights(xb, qw, has_importance, sigma2, weight)
            for k in range(2):
                levels[b, 2 * ib + k] = 0
            scales[ib] = f32(0.0)
            shifts[ib] = 0
            if _largest_magnitude(xb) < f32(1e-7):  # GROUP_MAX_EPS_IQ1_M
                continue
            scale = _largest_magnitude(xb)
            _stable_order(xb, order)
            # prefix sums per half of the sub-block, each half with its own shift
            for h in range(2):
                px[h, 0] = f32(0.0)
                pw[h, 0] = f32(0.0)
            for j in range(sub):
                i = order[j]
                h = 0 if i < half else 1
                px[h, j + 1] = px[h, j] + weight[i] * xb[i]
                px[1 - h, j + 1] = px[1 - h, j]
                pw[h, j + 1] = pw[h, j] + weight[i]
                pw[1 - h, j + 1] = pw[1 - h, j]
            best_score = -FLT_MAX
            best1 = -1
            best2 = -1
            best_k = -1
            for i1 in range(sub + 1):
                for i2 in range(i1, sub + 1):
                    sx0 = px[0, i1] + px[0, i2]
                    sx1 = px[1, i1] + px[1, i2]
                    qx_p0 = px[0, sub] * p2 - sx0
                    qx_m0 = px[0, sub] * m2 - sx0
                    qx_p1 = px[1, sub] * p2 - sx1
                    qx_m1 = px[1, sub] * m2 - sx1
                    q2_p0 = pw[0, sub] * p2 * p2 + pw[0, i1] * cp1 + pw[0, i2] * cp2
                    q2_m0 = pw[0, sub] * m2 * m2 + pw[0, i1] * cm1 + pw[0, i2] * cm2
                    q2_p1 = pw[1, sub] * p2 * p2 + pw[1, i1] * cp1 + pw[1, i2] * cp2
                    q2_m1 = pw[1, sub] * m2 * m2 + pw[1, i1] * cm1 + pw[1, i2] * cm2
                    sum_qx[0] = qx_p0 + qx_p1
                    sum_qx[1] = qx_p0 + qx_m1
                    sum_qx[2] = qx_m0 + qx_p1
                    sum_qx[3] = qx_m0 + qx_m1
                    sum_q2[0] = q2_p0 + q2_p1
                    sum_q2[1] = q2_p0 + q2_m1
                    sum_q2[2] = q2_m0 + q2_p1
                    sum_q2[3] = q2_m0 + q2_m1
                    for k in range(4):
                        if sum_q2[k] > 0 and sum_qx[k] * sum_qx[k] > best_score * sum_q2[k]:
                            scale = sum_qx[k] / sum_q2[k]
                            best_score = scale * sum_qx[k]
                            best1 = i1
                            best2 = i2
                            best_k = k
            if best1 < 0 or best2 < 0 or best_k < 0:
                continue
            for j in range(sub):
                L[order[j]] = 0 if j < best1 else (1 if j < best2 else 2)
            if scale < 0:
                for j in range(sub):
                    L[j] = 2 - L[j]
                scale = -scale
                best_k = 3 - best_k
            shift_of[0] = 0 if best_k < 2 else 1
            shift_of[1] = 0 if best_k % 2 == 0 else 1
            scale = _iq1_codewords(xb, weight, scale, shift_of, L, index_map, neighbours, shifted_grids, grid_levels,
                                   codewords)
            for k in range(2):
                levels[b, 2 * ib + k] = codewords[k]
            scales[ib] = scale
            shifts[ib] = best_k
            max_scale = max_scale if max_scale > scale else scale
        super_scale_bits[b] = 0
        for ib in range(QK_K // sub):
            sub_scales[b, ib] = 0
        if max_scale == 0:  # ggml keeps the codewords, but writes neither scales nor shifts
            continue
        d = max_scale / f32(15.0)
        inverse = f32(1.0) / d
        fit_qx = f32(0.0)
        fit_q2 = f32(0.0)
        for ib in range(QK_K // sub):
            level = max(0, min(7, nearest_int(f32(0.5) * (inverse * scales[ib] - f32(1.0)))))
            sub_scales[b, ib] = level
            xb = x[b, sub * ib:sub * (ib + 1)]
            qw = importance[b, sub * ib:sub * (ib + 1)] if has_importance else xb
            _iq1_weights(xb, qw, has_importance, sigma2, weight)
            for k in range(2):
                negative = (shifts[ib] >= 2) if k == 0 else (shifts[ib] % 2 == 1)
                xx = shifted[1 if negative else 0]
                index = levels[b, 2 * ib + k]
                for j in range(8):
                    w = weight[8 * k + j]
                    q = xx[grid_levels[index, j]] * f32(2 * level + 1)
                    fit_qx += w * q * xb[8 * k + j]
                    fit_q2 += w * q * q
                if negative:
                    levels[b, 2 * ib + k] = index | (1 << SIGN_SHIFT)
        if fit_q2 > 0:
            d = fit_qx / fit_q2
        super_scale_bits[b] = fp16_bits(d * f32(1.1125))


class ShiftedGrid(NamedTuple):
    """IQ1's levels under fixed parameters: weight = ``scale[codeword]·(values[index][i] + shift)``."""

    scale: torch.Tensor  # float32 [n_blocks, n_codewords]
    shift: torch.Tensor | None  # float32 [n_blocks, n_codewords] (IQ1_S), or None: from the levels (IQ1_M)
    values: torch.Tensor  # float32 [n_grid, 8]: -1, 0, 1

    def shifts(self, levels: torch.Tensor) -> torch.Tensor:
        if self.shift is not None:
            return self.shift
        negative = ((levels.to(torch.int64) >> SIGN_SHIFT) & 1) == 1
        return torch.where(negative, -IQ1_DELTA, IQ1_DELTA).to(torch.float32)

    def weights(self, levels: torch.Tensor) -> torch.Tensor:
        shifted = self.values[levels.to(torch.int64) & 0xFFFF] + self.shifts(levels)[:, :, None]
        return (self.scale[:, :, None] * shifted).reshape(levels.shape[0], -1)


class IQ1Format(CodebookFormat):
    """The shared steps of IQ1_S and IQ1_M: 8-weight codewords of the 2048-entry grid of -1/0/1."""

    levels_from_search = "ggml's codewords come from its exhaustive split and its neighbour lists"

    @property
    def grid(self) -> CodewordGrid:
        return codeword_grid("iq1s")

    @property
    def shifted_grids(self) -> np.ndarray:
        """float32 [2, 2048, 8]: the grid's levels read as x_p, then as x_m (the searches' q)."""
        return _shifted_grids()

    def _values(self, device) -> torch.Tensor:
        return torch.from_numpy(self.grid.values.astype(np.float32)).to(device)

    def encode(self, values, params, columns=None) -> torch.Tensor:
        """The codeword (and for IQ1_M the shift) of least squared error under fixed ``params``, per 8 weights.
        ``columns``: None, or a slice of whole codewords."""
        values = values if isinstance(values, torch.Tensor) else torch.from_numpy(np.asarray(values, np.float32))
        start, stop = 0, QK_K
        if columns is not None:
            if not isinstance(columns, slice) or (columns.step or 1) != 1:
                raise ValueError(f"{self.name}: encode takes a slice of whole codewords of 8 weights")
            start, stop, _ = columns.indices(QK_K)
            if start % 8 or stop % 8:
                raise ValueError(f"{self.name}: encode takes a slice of whole codewords of 8 weights")
        grid = self.reconstruct(params)
        scale = grid.scale[:, start // 8:stop // 8].cpu().numpy()
        fixed = grid.shift is not None
        shift = (grid.shift[:, start // 8:stop // 8] if fixed else torch.zeros(scale.shape)).cpu().numpy()
        x = np.ascontiguousarray(values.detach().to("cpu", torch.float32).numpy())
        levels = np.empty((x.shape[0], (stop - start) // 8), dtype=np.int32)
        _nearest_shifted_codewords(x, np.ascontiguousarray(scale), np.ascontiguousarray(shift), fixed,
                                   grid.values.cpu().numpy(), levels)
        return torch.from_numpy(levels).to(params.super_scale.device)


@kernel
def _nearest_shifted_codewords(x, scale, shift, fixed_shift, values, levels):
    n_grid = values.shape[0]
    for b in range(x.shape[0]):
        for c in range(levels.shape[1]):
            best = 0
            best_error = np.inf
            for sign in range(1 if fixed_shift else 2):
                delta = shift[b, c] if fixed_shift else (IQ1_DELTA if sign == 0 else -IQ1_DELTA)
                for j in range(n_grid):
                    error = 0.0
                    for i in range(8):
                        diff = scale[b, c] * (values[j, i] + delta) - x[b, 8 * c + i]
                        error += diff * diff
                    if error < best_error:
                        best_error = error
                        best = j | (sign << SIGN_SHIFT)
            levels[b, c] = best


class IQ1SParams(NamedTuple):
    """IQ1_S's stored parameters: weight = super_scale·(2·(n & 7) + 1)·(value ± 1/8), minus where n & 8."""

    super_scale: torch.Tensor  # float16 [n_blocks]
    sub_scales: torch.Tensor  # uint8 [n_blocks, 8]: ggml's 4-bit field, the 3-bit scale and the shift's sign


class IQ1_S(IQ1Format):
    """1.56 bpw: per 32 weights 4 codewords of 8 from a 2048-entry grid of -1/0/1, a 3-bit scale, a shift.

    Bytes: d (fp16) | 32 low index bytes | 8 uint16: 4 × 3 high index bits | scale << 12 | shift sign << 15.
    """

    name = "IQ1_S"
    weights_per_level = 8
    bytes_per_block = 50
    Params = IQ1SParams

    def search(self, blocks, importance, row_sigma2):
        if importance is None:
            raise ValueError(f"{self.name} needs an importance vector (ggml refuses to quantize it without one): "
                             f"give an imatrix (--imatrix FILE, or --calib TEXT to compute one)")
        grid = self.grid
        n = blocks.shape[0]
        super_scale_bits = np.empty(n, dtype=np.uint16)
        nibbles = np.empty((n, 8), dtype=np.uint8)
        levels = np.empty((n, 32), dtype=np.int32)
        _iq1_s_search(blocks, importance, _IQ1_SHIFTED, grid.index_map, grid.neighbours, self.shifted_grids,
                      grid.levels, super_scale_bits, nibbles, levels)
        return (fp16_tensor(super_scale_bits), nibbles), levels

    def reconstruct(self, params: IQ1SParams) -> ShiftedGrid:
        d = params.super_scale.to(torch.float32)[:, None]
        stored = params.sub_scales.to(torch.int32)
        scale = (d * (2 * (stored & 7) + 1).to(torch.float32)).repeat_interleave(4, dim=1)
        shift = torch.where((stored & 8) == 8, -IQ1_DELTA, IQ1_DELTA).to(torch.float32).repeat_interleave(4, dim=1)
        return ShiftedGrid(scale, shift, self._values(scale.device))

    def pack(self, levels: torch.Tensor, params: IQ1SParams) -> torch.Tensor:
        n = levels.shape[0]
        indices = (levels & 0xFFFF).to(torch.int64)
        high = ((indices >> 8).reshape(n, 8, 4) << torch.tensor([0, 3, 6, 9], device=levels.device)).sum(dim=2)
        qh = high | (params.sub_scales.to(torch.int64) << 12)
        return torch.cat([fp16_bytes(params.super_scale), (indices & 255).to(torch.uint8), _bytes_of(qh, 2)], dim=1)

    def unpack(self, data: torch.Tensor) -> tuple[torch.Tensor, IQ1SParams]:
        n = data.shape[0]
        qh = _words_of(data[:, 34:50], 2)
        high = (qh[:, :, None] >> torch.tensor([0, 3, 6, 9], device=data.device)) & 7
        indices = data[:, 2:34].to(torch.int64) | (high.reshape(n, 32) << 8)
        return indices.to(torch.int32), IQ1SParams(fp16_from_bytes(data[:, :2]), (qh >> 12).to(torch.uint8))


class IQ1MParams(NamedTuple):
    """IQ1_M's stored parameters: weight = super_scale·(2·sub_scale + 1)·(value ± 1/8) (the shift per codeword
    is in the levels, bit 16: minus)."""

    super_scale: torch.Tensor  # float16 [n_blocks]: stored in the top nibbles of the four scale words
    sub_scales: torch.Tensor  # uint8 [n_blocks, 16]: 3-bit scales


class IQ1_M(IQ1Format):
    """1.75 bpw: per 16 weights 2 codewords of 8 from the IQ1 grid with a shift each, and a 3-bit scale.

    Bytes: 32 low index bytes | 16 bytes: 3 high index bits and the shift sign per codeword | 4 uint16 of
    4 × 3-bit scales, their top nibbles the fp16 super-block scale.
    """

    name = "IQ1_M"
    weights_per_level = 8
    bytes_per_block = 56
    Params = IQ1MParams

    def search(self, blocks, importance, row_sigma2):
        grid = self.grid
        n = blocks.shape[0]
        super_scale_bits = np.empty(n, dtype=np.uint16)
        sub_scales = np.empty((n, 16), dtype=np.uint8)
        levels = np.empty((n, 32), dtype=np.int32)
        has_importance = importance is not None
        weights = importance if has_importance else np.empty((0, QK_K), dtype=np.float32)
        _iq1_m_search(blocks, weights, has_importance, _IQ1_SHIFTED, grid.index_map, grid.neighbours,
                      self.shifted_grids, grid.levels, super_scale_bits, sub_scales, levels)
        return (fp16_tensor(super_scale_bits), sub_scales), levels

    def reconstruct(self, params: IQ1MParams) -> ShiftedGrid:
        d = params.super_scale.to(torch.float32)[:, None]
        scale = d * (2 * params.sub_scales.to(torch.int32) + 1).to(torch.float32)
        return ShiftedGrid(scale.repeat_interleave(2, dim=1), None, self._values(scale.device))

    def pack(self, levels: torch.Tensor, params: IQ1MParams) -> torch.Tensor:
        n = levels.shape[0]
        levels = levels.to(torch.int64)
        indices = levels & 0xFFFF
        nibble = ((indices >> 8) | (((levels >> SIGN_SHIFT) & 1) << 3)).reshape(n, 16, 2)
        qh = nibble[:, :, 0] | (nibble[:, :, 1] << 4)
        scale_words = (params.sub_scales.to(torch.int64).reshape(n, 4, 4)
                       << torch.tensor([0, 3, 6, 9], device=levels.device)).sum(dim=2)
        d_bits = params.super_scale.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
        top = (d_bits[:, None] >> torch.tensor([0, 4, 8, 12], device=levels.device)) & 15
        scale_words = scale_words | (top << 12)
        return torch.cat([(indices & 255).to(torch.uint8), qh.to(torch.uint8), _bytes_of(scale_words, 2)], dim=1)

    def unpack(self, data: torch.Tensor) -> tuple[torch.Tensor, IQ1MParams]:
        n = data.shape[0]
        qh = data[:, 32:48].to(torch.int64)
        nibble = torch.stack([qh & 15, qh >> 4], dim=2).reshape(n, 32)
        levels = data[:, :32].to(torch.int64) | ((nibble & 7) << 8) | (((nibble >> 3) & 1) << SIGN_SHIFT)
        scale_words = _words_of(data[:, 48:56], 2)
        sub_scales = ((scale_words[:, :, None] >> torch.tensor([0, 3, 6, 9], device=data.device)) & 7).reshape(n, 16)
        d_bits = ((scale_words >> 12) << torch.tensor([0, 4, 8, 12], device=data.device)).sum(dim=1)
        super_scale = d_bits.to(torch.int32).to(torch.int16).view(torch.float16)
        return levels.to(torch.int32), IQ1MParams(super_scale, sub_scales.to(torch.uint8))
