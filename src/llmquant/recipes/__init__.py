"""Which type each tensor gets: llama.cpp's mixes (Q4_K_M, Q5_K_M, IQ4_XS, …) and their options.

Pure decisions over tensor names and shapes; nothing here reads or writes files.
"""

from llmquant.recipes.arch import ArchInfo, arch_info_from_metadata
from llmquant.recipes.file_types import FILE_TYPES, FileType, block_size, file_type, is_quantized
from llmquant.recipes.mixes import (
    Category,
    Fallback,
    MixOptions,
    MixPlan,
    TensorSpec,
    choose_tensor_types,
    llama_order_key,
    plan_mix,
    requires_imatrix,
    should_quantize,
    tensor_category,
)

__all__ = [
    "FILE_TYPES",
    "ArchInfo",
    "Category",
    "Fallback",
    "FileType",
    "MixOptions",
    "MixPlan",
    "TensorSpec",
    "arch_info_from_metadata",
    "block_size",
    "choose_tensor_types",
    "file_type",
    "is_quantized",
    "llama_order_key",
    "plan_mix",
    "requires_imatrix",
    "should_quantize",
    "tensor_category",
]
