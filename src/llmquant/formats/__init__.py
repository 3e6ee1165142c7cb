"""llama.cpp's block formats, byte-compatible with ggml.

    from llmquant.formats import quantize, dequantize, FORMATS
    data = quantize(weights, "Q4_K", imatrix=None)   # uint8 numpy [rows, row_bytes], ggml's block layout
    w = dequantize(data, "Q4_K", shape)              # float32 numpy (or torch, same device as data)

Each format's steps are public too (``base.BlockFormat``): ``choose_params``, ``reconstruct``, ``encode``,
``pack``, ``unpack``. ggml's searches are numba ports run on the CPU; the rest is PyTorch on any device.
Pure block math: nothing here knows of files, models or the command line.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from llmquant.formats import floats, iq_lowbit, iquants, kquants, legacy  # noqa: F401  (registers the formats)
from llmquant.formats.base import REGISTRY, BlockFormat, Grid

FORMATS: dict[str, BlockFormat] = REGISTRY

# rows per chunk so that a chunk holds about this many weights: bounds the temporaries of packing
_CHUNK_WEIGHTS = 1 << 20


def get_format(type_name: str) -> BlockFormat:
    try:
        return FORMATS[type_name.upper()]
    except (KeyError, AttributeError):
        known = ", ".join(sorted(FORMATS))
        raise ValueError(f"unknown tensor type {type_name!r}; known types: {known}") from None


def _as_float_tensor(weights) -> torch.Tensor:
    if isinstance(weights, torch.Tensor):
        return weights.detach().to(torch.float32)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(weights, dtype=np.float32)))


def quantize(weights, type_name: str, imatrix=None, chunk_rows: int | None = None) -> np.ndarray:
    """Quantize 2-D float weights (numpy or torch, any device) to ggml's bytes: uint8 numpy ``[rows, row_bytes]``.

    ``imatrix`` is one non-negative importance per input column (length = row length), or None. F32 of float32
    CPU weights is a read-only view of their memory (no copy), so it changes if they do.
    """
    fmt = get_format(type_name)
    w = _as_float_tensor(weights)
    if w.ndim != 2:
        raise ValueError(f"{fmt.name}: expected 2-D weights [rows, row_length], got shape {tuple(w.shape)}")
    rows, n_per_row = w.shape
    if n_per_row % fmt.block_size:
        raise ValueError(
            f"{fmt.name}: row length {n_per_row} is not a multiple of the block size {fmt.block_size}"
        )
    # a finite sum proves every weight finite (one fast pass); only otherwise look closer
    if not bool(torch.isfinite(w.sum())) and not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"{fmt.name}: weights contain {bad} non-finite values (NaN or inf)")
    importance = None
    if imatrix is not None:
        importance = _as_float_tensor(imatrix).to(w.device).reshape(-1)
        if importance.numel() != n_per_row:
            raise ValueError(
                f"{fmt.name}: imatrix has {importance.numel()} values but rows have {n_per_row} columns"
            )
        if not bool(torch.isfinite(importance).all()):
            raise ValueError(f"{fmt.name}: imatrix contains non-finite values")
        if bool((importance < 0).any()):
            raise ValueError(f"{fmt.name}: imatrix contains negative values (it holds mean squared activations)")
    whole = fmt.quantize_finite(w)
    if whole is not None:
        return whole
    blocks_per_row = n_per_row // fmt.block_size
    row_bytes = blocks_per_row * fmt.bytes_per_block
    out = np.empty((rows, row_bytes), dtype=np.uint8)
    step = chunk_rows or max(1, _CHUNK_WEIGHTS // max(n_per_row, 1))
    for start in range(0, rows, step):
        chunk = w[start:start + step].contiguous()
        data = fmt.quantize_rows(chunk, importance)
        out[start:start + chunk.shape[0]] = data.reshape(chunk.shape[0], row_bytes).cpu().numpy()
    return out


def _read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """torch.from_numpy, also of read-only arrays (F32's view of the weights, memory-mapped files): the
    dequantizers only read, so torch's warning about writing to them does not apply."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def dequantize(data, type_name: str, shape: Sequence[int]):
    """ggml bytes → float32 weights of ``shape`` (numpy in, numpy out; torch in, torch out on the same device)."""
    fmt = get_format(type_name)
    shape = tuple(int(s) for s in shape)
    n_elements = int(np.prod(shape)) if shape else 1
    if n_elements % fmt.block_size:
        raise ValueError(f"{fmt.name}: {n_elements} weights is not a multiple of the block size {fmt.block_size}")
    n_blocks = n_elements // fmt.block_size
    as_numpy = not isinstance(data, torch.Tensor)
    raw = _read_only_tensor(np.ascontiguousarray(data).view(np.uint8).reshape(-1)) if as_numpy else data
    raw = raw.reshape(-1)
    if raw.dtype != torch.uint8:
        raise ValueError(f"{fmt.name}: expected uint8 data, got {raw.dtype}")
    if raw.numel() != n_blocks * fmt.bytes_per_block:
        raise ValueError(
            f"{fmt.name}: {raw.numel()} bytes do not hold {n_elements} weights "
            f"(expected {n_blocks * fmt.bytes_per_block})"
        )
    values = fmt.dequantize_blocks(raw.reshape(n_blocks, fmt.bytes_per_block)).reshape(shape)
    return values.cpu().numpy() if as_numpy else values


__all__ = ["FORMATS", "BlockFormat", "Grid", "dequantize", "get_format", "quantize"]
