"""ggml's reference quantizer (``ggml_quantize_chunk``) from llama-cpp-python's bundled ``libggml-base``.

    data = ggml_quantize(weights, "Q4_K", imatrix=None)   # uint8 [rows, row_bytes], ggml's exact bytes

This is the byte-for-byte oracle for every block format: the same C function ``llama-quantize`` calls.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


class OracleUnavailable(RuntimeError):
    """llama-cpp-python (the ``llamacpp`` extra) is not installed or its library cannot be loaded."""


def llama_cpp_lib_dir() -> Path:
    """The folder holding llama-cpp-python's bundled shared libraries, found without importing the module."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise OracleUnavailable("llama-cpp-python is not installed: pip install 'llmquant[llamacpp]'")
    for location in spec.submodule_search_locations:
        lib_dir = Path(location) / "lib"
        if lib_dir.is_dir():
            return lib_dir
    raise OracleUnavailable("llama-cpp-python is installed but has no lib/ folder with its shared libraries")


@functools.lru_cache(maxsize=1)
def ggml_base() -> ctypes.CDLL:
    """Load ``libggml-base`` and declare the functions we call."""
    lib_dir = llama_cpp_lib_dir()
    candidates = sorted(lib_dir.glob("libggml-base.*"))
    if not candidates:
        raise OracleUnavailable(f"no libggml-base shared library in {lib_dir}")
    lib = ctypes.CDLL(str(candidates[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,  # enum ggml_type
        ctypes.c_void_p,  # const float * src
        ctypes.c_void_p,  # void * dst
        ctypes.c_int64,  # start (element index, a multiple of n_per_row)
        ctypes.c_int64,  # nrows
        ctypes.c_int64,  # n_per_row
        ctypes.c_void_p,  # const float * imatrix (NULL for none)
    ]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def ggml_type(type_name: str) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType[type_name.upper()]
    except KeyError:
        raise ValueError(f"unknown ggml type {type_name!r}") from None


def ggml_requires_imatrix(type_name: str) -> bool:
    return bool(ggml_base().ggml_quantize_requires_imatrix(int(ggml_type(type_name))))


def ggml_quantize(weights: np.ndarray, type_name: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize a 2-D float array with ggml's own code; returns uint8 ``[rows, row_bytes]``."""
    qtype = ggml_type(type_name)
    src = np.ascontiguousarray(np.asarray(weights, dtype=np.float32))
    if src.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {src.shape}")
    rows, n_per_row = src.shape
    block_size, bytes_per_block = GGML_QUANT_SIZES[qtype]
    if n_per_row % block_size:
        raise ValueError(f"{qtype.name}: row length {n_per_row} is not a multiple of the block size {block_size}")
    row_bytes = n_per_row // block_size * bytes_per_block
    dst = np.zeros((rows, row_bytes), dtype=np.uint8)
    imatrix_arr = None
    if imatrix is not None:
        imatrix_arr = np.ascontiguousarray(np.asarray(imatrix, dtype=np.float32))
        if imatrix_arr.shape != (n_per_row,):
            raise ValueError(f"imatrix must have shape ({n_per_row},), got {imatrix_arr.shape}")
    lib = ggml_base()
    lib.ggml_quantize_init(int(qtype))
    written = lib.ggml_quantize_chunk(
        int(qtype),
        src.ctypes.data,
        dst.ctypes.data,
        0,
        rows,
        n_per_row,
        None if imatrix_arr is None else imatrix_arr.ctypes.data,
    )
    if written != dst.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {dst.nbytes}")
    return dst
