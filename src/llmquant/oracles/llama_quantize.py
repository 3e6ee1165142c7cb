"""llama.cpp's own ``llama_model_quantize`` (what ``llama-quantize`` runs), through llama-cpp-python.

    result = llama_quantize("model-f32.gguf", "model-q4_k_m.gguf", "Q4_K_M", nthread=2)
    result.tensor_types()   # {"blk.0.attn_v.weight": "Q6_K", …}, read back from the written file

The oracle for the mixes (``llmquant.recipes``) and the reference for the quantize benchmarks.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

from llmquant.gguf_io.header import read_gguf_header
from llmquant.oracles.ggml import OracleUnavailable

_FALLBACK_COUNT = re.compile(r"WARNING: (\d+) of (\d+) tensor\(s\) required fallback quantization")
_LOG_LOCK = threading.Lock()  # llama.cpp's log callback is process-wide


class LlamaQuantizeError(RuntimeError):
    """llama_model_quantize returned non-zero; the message carries the end of llama.cpp's log."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(message)
        self.log = log


@dataclass
class QuantizeResult:
    output: Path
    seconds: float
    log: str

    @property
    def n_fallback(self) -> int:
        """llama.cpp's count of tensors whose rows did not fit the wanted type (0 when it printed none)."""
        match = _FALLBACK_COUNT.search(self.log)
        return int(match.group(1)) if match else 0

    def tensor_types(self) -> dict[str, str]:
        return {tensor.name: tensor.type_name for tensor in read_gguf_header(self.output).tensors}


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise OracleUnavailable(f"llama-cpp-python is not importable: {error}") from error
    return llama_cpp


def _type_id(what: str, type_name: str) -> int:
    try:
        return int(GGMLQuantizationType[type_name.upper()])
    except KeyError:
        raise ValueError(f"{what}: unknown ggml type {type_name!r}") from None


def llama_quantize(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    file_type: str,
    *,
    nthread: int = 2,
    pure: bool = False,
    output_tensor_type: str | None = None,
    token_embedding_type: str | None = None,
    tensor_types: Sequence[tuple[str, str]] = (),
    leave_output_tensor: bool = False,
    imatrix: Mapping[str, np.ndarray] | None = None,
) -> QuantizeResult:
    """Quantize GGUF ``src`` into ``dst`` as file type ``file_type`` ("Q4_K_M") with llama.cpp's own code.

    Options mirror llama-quantize's --pure, --output-tensor-type, --token-embedding-type, --tensor-type,
    --leave-output-tensor and --imatrix (here a mapping tensor name -> float32 importance per column).
    """
    llama_cpp = _llama_cpp()
    name = file_type.upper()
    ftype = LlamaFileType.ALL_F32 if name == "F32" else getattr(LlamaFileType, f"MOSTLY_{name}", None)
    if ftype is None:
        raise ValueError(f"unknown llama.cpp file type {file_type!r}")

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = nthread
    params.pure = pure
    params.quantize_output_tensor = not leave_output_tensor
    if output_tensor_type is not None:
        params.output_tensor_type = _type_id("output_tensor_type", output_tensor_type)
    if token_embedding_type is not None:
        params.token_embedding_type = _type_id("token_embedding_type", token_embedding_type)

    keep_alive: list[object] = []  # ctypes buffers must outlive the call
    if tensor_types:
        overrides = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (pattern, type_name) in enumerate(tensor_types):
            overrides[i].pattern = pattern.encode()
            overrides[i].type = _type_id(f"tensor type for {pattern!r}", type_name)
        overrides[len(tensor_types)].pattern = None  # the list ends at a NULL pattern
        params.tt_overrides = overrides
        keep_alive.append(overrides)
    if imatrix is not None:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (tensor_name, values) in enumerate(imatrix.items()):
            array = np.ascontiguousarray(values, dtype=np.float32)
            keep_alive.append(array)
            entries[i].name = tensor_name.encode()
            entries[i].data = array.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = array.size
        entries[len(imatrix)].name = None
        params.imatrix = entries
        keep_alive.append(entries)

    log_parts: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        log_parts.append(text.decode("utf-8", "replace"))

    dst = Path(dst)
    with _LOG_LOCK:
        llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
        try:
            start = time.perf_counter()
            status = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
            seconds = time.perf_counter() - start
        finally:
            from llama_cpp import _logger

            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    log = "".join(log_parts)
    if status != 0:
        tail = "\n".join(log.strip().splitlines()[-8:])
        raise LlamaQuantizeError(f"llama_model_quantize {src} -> {dst} as {name} failed:\n{tail}", log)
    return QuantizeResult(output=dst, seconds=seconds, log=log)


__all__ = ["LlamaQuantizeError", "QuantizeResult", "llama_quantize"]
