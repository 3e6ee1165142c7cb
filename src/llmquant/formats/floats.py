"""Unquantized types: F32, F16, BF16 (block size 1): conversions, with no parameters to choose."""

from __future__ import annotations

import numpy as np
import torch

from llmquant.formats.base import BlockFormat


def _converted(weights: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """Finite float32 weights converted in one pass straight into the result's memory, as uint8 rows."""
    out = torch.empty(weights.shape, dtype=dtype)
    out.copy_(weights)  # round to nearest even, as ggml; NaN (which ggml quiets its own way) cannot occur
    return out.view(torch.int16).numpy().view(np.uint8)


class F32(BlockFormat):
    """Plain float32, stored as its four little-endian bytes (ggml copies the row)."""

    name = "F32"
    block_size = 1
    bytes_per_block = 4

    def quantize_blocks(self, blocks: torch.Tensor, importance=None, row_sigma2=None) -> torch.Tensor:
        return blocks.to(torch.float32).contiguous().view(torch.uint8).reshape(-1, 4)

    def quantize_finite(self, weights: torch.Tensor) -> np.ndarray:
        """The weights' own bytes: for contiguous float32 CPU weights a read-only view of them, no copy."""
        values = weights.detach().cpu().contiguous().numpy().view(np.uint8)
        values.flags.writeable = False
        return values

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        return data.contiguous().view(torch.float32).reshape(-1, 1)


class F16(BlockFormat):
    """IEEE half precision, rounded to nearest even as ggml's ggml_compute_fp32_to_fp16."""

    name = "F16"
    block_size = 1
    bytes_per_block = 2

    def quantize_blocks(self, blocks: torch.Tensor, importance=None, row_sigma2=None) -> torch.Tensor:
        values = blocks.to(torch.float32).reshape(-1)
        bits = values.to(torch.float16).view(torch.int16)
        if not torch.isnan(values.sum()):  # a sum is NaN whenever a term is (one fast pass): no NaN to rewrite
            return bits.view(torch.uint8).reshape(-1, 2)
        # ggml writes every NaN as the quiet NaN 0x7e00 with the input's sign; torch keeps payload bits
        quiet_nan = torch.where(torch.signbit(values), torch.tensor(-0x200, dtype=torch.int16, device=values.device),
                                torch.tensor(0x7E00, dtype=torch.int16, device=values.device))
        bits = torch.where(torch.isnan(values), quiet_nan, bits)
        return bits.view(torch.uint8).reshape(-1, 2)

    def quantize_finite(self, weights: torch.Tensor) -> np.ndarray:
        return _converted(weights, torch.float16)

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        return data.contiguous().view(torch.float16).to(torch.float32).reshape(-1, 1)


class BF16(BlockFormat):
    """bfloat16: the top half of float32, rounded to nearest even, as ggml's ggml_compute_fp32_to_bf16."""

    name = "BF16"
    block_size = 1
    bytes_per_block = 2

    def quantize_blocks(self, blocks: torch.Tensor, importance=None, row_sigma2=None) -> torch.Tensor:
        values = blocks.to(torch.float32)
        if not torch.isnan(values.sum()):  # no NaN: torch's conversion rounds to nearest even, as ggml
            return values.to(torch.bfloat16).contiguous().view(torch.uint8).reshape(-1, 2)
        # int64 holds the unsigned 32-bit pattern, so the rounding carry cannot overflow
        bits = values.contiguous().view(torch.int32).reshape(-1).to(torch.int64) & 0xFFFFFFFF
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        quieted = (bits >> 16) | 64  # ggml keeps a NaN's top bits and forces it quiet
        half = torch.where(is_nan, quieted, rounded) & 0xFFFF
        return torch.stack([half & 0xFF, half >> 8], dim=1).to(torch.uint8)

    def quantize_finite(self, weights: torch.Tensor) -> np.ndarray:
        return _converted(weights, torch.bfloat16)

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        half = data.to(torch.int32)
        bits = (half[:, 0] | (half[:, 1] << 8)) << 16
        return bits.view(torch.float32).reshape(-1, 1)
