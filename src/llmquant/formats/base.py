"""The block-format shape and the registry: a format is one class, registered when it is defined.

A block format is ggml's chain of steps, each public and vectorized over blocks (``[n_blocks, block_size]``
float32, numpy or torch, CPU or CUDA):

    params = fmt.choose_params(blocks, importance)   # what ggml stores per block, found by ggml's own search
    grid = fmt.reconstruct(params)                    # per weight: x ≈ scale·values[level] + offset
    levels = fmt.encode(other_blocks, params)         # nearest levels under fixed parameters (any columns)
    data = fmt.pack(levels, params)                   # ggml's bytes; fmt.unpack(data) gives both back
    data = fmt.quantize_blocks(blocks, importance)    # the composition: ggml's bytes exactly

``formats/__init__`` turns 2-D weights into blocks and the bytes back into rows.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import numpy as np
import torch

REGISTRY: dict[str, BlockFormat] = {}


class Grid(NamedTuple):
    """What each level means under fixed parameters: weight ≈ ``scale · values[level] + offset``.

    ``scale`` and ``offset`` are float32 ``[n_blocks, block_size]`` (``offset`` None for the symmetric formats);
    ``values`` float32 ``[n_levels]``, ascending: consecutive integers for the linear grids, the format's table
    for the non-linear ones. ``dequantize`` computes exactly this, in ggml's order."""

    scale: torch.Tensor
    offset: torch.Tensor | None
    values: torch.Tensor

    def weights(self, levels: torch.Tensor, columns: slice | torch.Tensor | None = None) -> torch.Tensor:
        """The weights that ``levels`` (``[n_blocks, len(columns)]``) stand for."""
        scale, offset = self._columns(columns)
        out = scale * self.values[levels.long()]
        return out if offset is None else out + offset

    def nearest(self, values: torch.Tensor, columns: slice | torch.Tensor | None = None) -> torch.Tensor:
        """The nearest level of each value (``[n_blocks, len(columns)]``): ``(x - offset)/scale`` rounded half to
        even onto a linear grid (ggml's nearest_int), or to the nearest table value with ties upward (ggml's
        best_index_int8), clamped to the grid. A zero scale reads every value as 0, as ggml's ``id = d ? 1/d : 0``.
        Returns int32 level indices."""
        scale, offset = self._columns(columns)
        shifted = values.to(torch.float32) if offset is None else values.to(torch.float32) - offset
        zero = scale == 0
        scaled = (shifted / torch.where(zero, torch.ones_like(scale), scale)).masked_fill_(zero, 0.0)
        first, count = self.values[0], self.values.numel()
        if bool((self.values[1:] - self.values[:-1] == 1).all()):
            return (torch.round(scaled) - first).clamp_(0, count - 1).to(torch.int32)
        midpoints = (self.values[1:] + self.values[:-1]) / 2
        return torch.searchsorted(midpoints, scaled.contiguous(), right=True).to(torch.int32)

    def _columns(self, columns):
        if columns is None:
            return self.scale, self.offset
        return self.scale[:, columns], (None if self.offset is None else self.offset[:, columns])


class BlockFormat:
    """One llama.cpp tensor type. A subclass sets the class attributes and implements ``search`` (ggml's
    parameters and levels), ``reconstruct``, ``pack`` and ``unpack``; the rest composes them."""

    name: ClassVar[str]
    block_size: ClassVar[int]  # weights per block
    bytes_per_block: ClassVar[int]
    needs_imatrix: ClassVar[bool] = False  # True where an importance vector is needed for good quality
    # one line where ggml's final levels come from its search rather than from the stored parameters (then
    # quantize_blocks packs ggml's levels, and encode under the stored parameters may differ from them)
    levels_from_search: ClassVar[str | None] = None
    # ggml's imatrix search also weighs by the mean square of the whole row (the legacy types): quantize_rows
    # passes it to the search as ``row_sigma2``
    uses_row_statistics: ClassVar[bool] = False
    # weights one level stands for: 1 where each weight has its level on a Grid; 4 or 8 for the codebook
    # i-quants (formats/iq_lowbit.py), whose levels are codewords and whose encode takes whole groups of 8
    weights_per_level: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            REGISTRY[cls.name] = cls()

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes_per_block / self.block_size

    # ---- what a format implements ----

    def search(self, blocks: np.ndarray, importance: np.ndarray | None,
               row_sigma2: np.ndarray | None) -> tuple[tuple, np.ndarray]:
        """ggml's quantizer on float32 numpy ``[n_blocks, block_size]`` (importance the same shape, or None):
        (the stored parameters as numpy arrays, in the order of the format's ``Params``; ggml's levels
        ``[n_blocks, block_size]``)."""
        raise NotImplementedError

    def reconstruct(self, params: NamedTuple) -> Grid:
        raise NotImplementedError

    def pack(self, levels: torch.Tensor, params: NamedTuple) -> torch.Tensor:
        """Level indices ``[n_blocks, block_size]`` and parameters → uint8 ``[n_blocks, bytes_per_block]``."""
        raise NotImplementedError

    def unpack(self, data: torch.Tensor) -> tuple[torch.Tensor, NamedTuple]:
        """uint8 ``[n_blocks, bytes_per_block]`` → (level indices, parameters): the inverse of ``pack``."""
        raise NotImplementedError

    Params: ClassVar[type]  # the NamedTuple of the stored parameters, each a tensor with n_blocks first

    # ---- the composition ----

    def choose_params(self, blocks, importance=None, row_sigma2=None) -> NamedTuple:
        """The parameters ggml stores for each block, found by ggml's own search (importance-weighted when
        given, one value per weight), as tensors on the blocks' device. ``row_sigma2``: for the formats that
        ``uses_row_statistics``, the mean square of each block's row (default: the block's own)."""
        return self._searched(blocks, importance, row_sigma2)[0]

    def encode(self, values, params: NamedTuple, columns: slice | torch.Tensor | None = None) -> torch.Tensor:
        """Nearest levels of ``values`` under fixed ``params`` (see ``Grid.nearest``), on the whole block or on
        the block positions ``columns`` (``values`` then ``[n_blocks, len(columns)]``)."""
        values = _as_tensor(values)
        return self.reconstruct(params).nearest(values.to(params[0].device), columns)

    def quantize_blocks(self, blocks, importance=None, row_sigma2=None) -> torch.Tensor:
        """float32 ``[n_blocks, block_size]`` → ggml's bytes, uint8 ``[n_blocks, bytes_per_block]``."""
        params, levels = self._searched(blocks, importance, row_sigma2)
        return self.pack(levels, params)

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        """uint8 ``[n_blocks, bytes_per_block]`` → float32 ``[n_blocks, block_size]``."""
        levels, params = self.unpack(data)
        return self.reconstruct(params).weights(levels)

    def quantize_finite(self, weights: torch.Tensor) -> np.ndarray | None:
        """The whole of 2-D float32 ``weights``, already checked finite, at once (uint8 numpy ``[rows, row_bytes]``),
        or None where the format goes by chunks of rows (every block format)."""
        return None

    def quantize_rows(self, rows: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        """float32 ``[n_rows, n_per_row]`` (+ one importance per column, or None) → uint8 ``[n_rows, row_bytes]``."""
        n_rows, n_per_row = rows.shape
        blocks = rows.reshape(-1, self.block_size)
        block_importance = row_sigma2 = None
        if importance is not None:
            block_importance = importance.reshape(1, -1).expand(n_rows, -1).reshape(-1, self.block_size)
            if self.uses_row_statistics:
                row_sigma2 = row_mean_square(rows).repeat_interleave(n_per_row // self.block_size)
        return self.quantize_blocks(blocks, block_importance, row_sigma2).reshape(n_rows, -1)

    def _searched(self, blocks, importance, row_sigma2) -> tuple[NamedTuple, torch.Tensor]:
        blocks = _as_tensor(blocks)
        device = blocks.device
        # ggml's searches run on the CPU (a small part of a GPU job); the results go back to the blocks' device
        x = np.ascontiguousarray(blocks.detach().to("cpu", torch.float32).numpy())
        w = None if importance is None else np.ascontiguousarray(
            _as_tensor(importance).detach().to("cpu", torch.float32).numpy().reshape(x.shape))
        sigma2 = None
        if w is not None and self.uses_row_statistics:
            sigma2 = (row_mean_square(torch.from_numpy(x)).numpy() if row_sigma2 is None
                      else np.ascontiguousarray(_as_tensor(row_sigma2).detach().to("cpu", torch.float32).numpy()))
        params, levels = self.search(x, w, sigma2)
        as_tensors = self.Params(*(torch.from_numpy(np.asarray(p)).to(device) for p in params))
        return as_tensors, torch.from_numpy(levels).to(device)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(block_size={self.block_size}, bytes_per_block={self.bytes_per_block}, "
                f"needs_imatrix={self.needs_imatrix})")


def row_mean_square(rows: torch.Tensor) -> torch.Tensor:
    """``sigma2`` of ggml's legacy imatrix quantizers: each row's Σx², summed left to right in float32 (numpy's
    reduction over axis 0 of a C-contiguous array is that loop), over the row length."""
    x = np.ascontiguousarray(rows.detach().to("cpu", torch.float32).numpy())
    sums = np.add.reduce(np.ascontiguousarray((x * x).T), axis=0, initial=np.float32(0.0))
    return torch.from_numpy(sums / np.float32(x.shape[1])).to(rows.device)


def _as_tensor(values) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values
    return torch.from_numpy(np.ascontiguousarray(np.asarray(values, dtype=np.float32)))


def fp16_tensor(bits: np.ndarray) -> np.ndarray:
    """ggml_half bits (any integer array) as the float16 numpy array a ``Params`` holds."""
    return np.asarray(bits, dtype=np.uint16).view(np.float16)
