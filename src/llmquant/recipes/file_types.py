"""llama.cpp's file types (``LLAMA_FTYPE_*``) and the tensor types they are built from.

A file type names a *mix*: one default tensor type (``llama_ftype_get_default_type``) that
``mixes.choose_tensor_types`` then adjusts per tensor. Tensor types are named as ggml names them
(``"Q4_K"``, ``"IQ4_XS"``); their block sizes decide the fallbacks for rows that do not fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


@dataclass(frozen=True)
class FileType:
    name: str  # as llama-quantize spells it: "Q4_K_M"
    ftype: int  # llama.cpp's LLAMA_FTYPE_* value, written to general.file_type
    default_type: str  # the tensor type most weights get (llama_ftype_get_default_type)


# name, LLAMA_FTYPE_* id, default tensor type: llama.cpp's llama_ftype_get_default_type.
# Left out: NVFP4 (llama.cpp has no default type for it) and Q2_0 (its tensor type is unknown to gguf-py).
_FILE_TYPE_ROWS: tuple[tuple[str, int, str], ...] = (
    ("F32", 0, "F32"),
    ("F16", 1, "F16"),
    ("Q4_0", 2, "Q4_0"),
    ("Q4_1", 3, "Q4_1"),
    ("Q8_0", 7, "Q8_0"),
    ("Q5_0", 8, "Q5_0"),
    ("Q5_1", 9, "Q5_1"),
    ("Q2_K", 10, "Q2_K"),
    ("Q3_K_S", 11, "Q3_K"),
    ("Q3_K_M", 12, "Q3_K"),
    ("Q3_K_L", 13, "Q3_K"),
    ("Q4_K_S", 14, "Q4_K"),
    ("Q4_K_M", 15, "Q4_K"),
    ("Q5_K_S", 16, "Q5_K"),
    ("Q5_K_M", 17, "Q5_K"),
    ("Q6_K", 18, "Q6_K"),
    ("IQ2_XXS", 19, "IQ2_XXS"),
    ("IQ2_XS", 20, "IQ2_XS"),
    ("Q2_K_S", 21, "Q2_K"),
    ("IQ3_XS", 22, "IQ3_S"),
    ("IQ3_XXS", 23, "IQ3_XXS"),
    ("IQ1_S", 24, "IQ1_S"),
    ("IQ4_NL", 25, "IQ4_NL"),
    ("IQ3_S", 26, "IQ3_S"),
    ("IQ3_M", 27, "IQ3_S"),
    ("IQ2_S", 28, "IQ2_XS"),  # not a typo: llama.cpp's IQ2_S mix is built on IQ2_XS
    ("IQ2_M", 29, "IQ2_S"),
    ("IQ4_XS", 30, "IQ4_XS"),
    ("IQ1_M", 31, "IQ1_M"),
    ("BF16", 32, "BF16"),
    ("TQ1_0", 36, "TQ1_0"),
    ("TQ2_0", 37, "TQ2_0"),
    ("MXFP4_MOE", 38, "MXFP4"),
    ("Q1_0", 40, "Q1_0"),
)

FILE_TYPES: dict[str, FileType] = {name: FileType(name, ftype, default) for name, ftype, default in _FILE_TYPE_ROWS}

# Types ggml stores unquantized (ggml_is_quantized is false): mixes, overrides and fallbacks leave them alone.
UNQUANTIZED_TYPES = frozenset({"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"})

# Block sizes gguf-py does not know yet (ggml-common.h: QK2_0).
_EXTRA_BLOCK_SIZES = {"Q2_0": 64}


def file_type(name: str) -> FileType:
    """The file type called ``name`` (case-insensitive), or a clear error listing the known ones."""
    found = FILE_TYPES.get(name.upper())
    if found is None:
        known = ", ".join(FILE_TYPES)
        raise ValueError(f"unknown llama.cpp file type {name!r}; known file types: {known}")
    return found


def block_size(type_name: str) -> int:
    """How many weights one block of ``type_name`` holds (1 for the float types); a row must be a multiple."""
    if type_name in _EXTRA_BLOCK_SIZES:
        return _EXTRA_BLOCK_SIZES[type_name]
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType[type_name]][0]
    except KeyError:
        raise ValueError(f"unknown ggml tensor type {type_name!r}") from None


def is_quantized(type_name: str) -> bool:
    """ggml_is_quantized: true for every block format, false for floats and integers."""
    block_size(type_name)  # validates the name
    return type_name not in UNQUANTIZED_TYPES


__all__ = ["FILE_TYPES", "UNQUANTIZED_TYPES", "FileType", "block_size", "file_type", "is_quantized"]
