"""The block-format base class and registry: a format is one class, registered when it is defined.

Every format works on whole tensors of blocks at once (``[n_blocks, block_size]``); ``formats/__init__``
turns 2-D weights into blocks and the bytes back into rows.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

REGISTRY: dict[str, BlockFormat] = {}


class BlockFormat:
    """One llama.cpp tensor type. Subclasses set the class attributes and implement the two block methods."""

    name: ClassVar[str]
    block_size: ClassVar[int]  # weights per block
    bytes_per_block: ClassVar[int]
    needs_imatrix: ClassVar[bool] = False  # True where an importance vector is needed for good quality
    chunk_weights: ClassVar[int | None] = None  # weights per quantize_rows call; None: formats/__init__'s default
    # the same with an importance vector (first choice), and while ``compiled`` kernels run (each call costs more)
    chunk_weights_imatrix: ClassVar[int | None] = None
    fused_chunk_weights: ClassVar[int | None] = None

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

    def quantize_finite(self, weights: torch.Tensor) -> np.ndarray | None:
        """The whole of 2-D float32 ``weights``, already checked finite, at once: uint8 numpy
        ``[rows, row_bytes]``; or None, where the format has no such shortcut and goes by chunks of rows."""
        return None

    def quantize_rows(self, rows: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        """float32 ``[n_rows, n_per_row]`` (+ one importance per column, ``[n_per_row]``, or None)
        → uint8 ``[n_rows, row_bytes]``.

        Cuts the rows into blocks for ``quantize_blocks``. A format whose ggml search also uses a statistic
        of the whole row (the legacy types' imatrix paths weigh by the row's mean square) overrides this.
        """
        n_rows = rows.shape[0]
        blocks = rows.reshape(-1, self.block_size)
        block_importance = None
        if importance is not None:
            block_importance = importance.reshape(1, -1).expand(n_rows, -1).reshape(-1, self.block_size)
        return self.quantize_blocks(blocks, block_importance).reshape(n_rows, -1)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(block_size={self.block_size}, bytes_per_block={self.bytes_per_block}, "
                f"needs_imatrix={self.needs_imatrix})")
