"""The block-format base class and registry: a format is one class, registered when it is defined.

Every format works on whole tensors of blocks at once (``[n_blocks, block_size]``); ``formats/__init__``
turns 2-D weights into blocks and the bytes back into rows.
"""

from __future__ import annotations

from typing import ClassVar

import torch

REGISTRY: dict[str, BlockFormat] = {}


class BlockFormat:
    """One llama.cpp tensor type. Subclasses set the class attributes and implement the two block methods."""

    name: ClassVar[str]
    block_size: ClassVar[int]  # weights per block
    bytes_per_block: ClassVar[int]
    needs_imatrix: ClassVar[bool] = False  # True where an importance vector is needed for good quality

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            REGISTRY[cls.name] = cls()

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes_per_block / self.block_size

    def quantize_blocks(self, blocks: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        """float32 ``[n_blocks, block_size]`` (+ the importance of each weight, same shape, or None)
        → uint8 ``[n_blocks, bytes_per_block]`` in ggml's layout."""
        raise NotImplementedError

    def dequantize_blocks(self, data: torch.Tensor) -> torch.Tensor:
        """uint8 ``[n_blocks, bytes_per_block]`` → float32 ``[n_blocks, block_size]``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(block_size={self.block_size}, bytes_per_block={self.bytes_per_block}, "
                f"needs_imatrix={self.needs_imatrix})")
