"""llama.cpp's own ``llama_model_quantize`` (what ``llama-quantize`` runs), through llama-cpp-python.

    result = llama_quantize("model-f32.gguf", "model-q4_k_m.gguf", "Q4_K_M", nthread=2)
    result.tensor_types()   # {"blk.0.attn_v.weight": "Q6_K", …}, read back from the written file

    # as `llama-quantize --imatrix imatrix.gguf`: the file's vectors, and the quantize.imatrix.* keys it writes
    llama_quantize("model-f32.gguf", "model-q4_k_m.gguf", "Q4_K_M", imatrix_file="imatrix.gguf")

The oracle for the mixes (``llmquant.recipes``), for whole quantized files, and the reference for the quantize
benchmarks.
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
# a llama_model_kv_override's key and val_str: 127 bytes and a NUL
_KV_OVERRIDE_BYTES = 127

KVValue = bool | int | float | str | bytes


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
    imatrix_file: str | os.PathLike | None = None,
    kv_overrides: Sequence[tuple[str, KVValue]] = (),
) -> QuantizeResult:
    """Quantize GGUF ``src`` into ``dst`` as file type ``file_type`` ("Q4_K_M") with llama.cpp's own code.

    Options mirror llama-quantize's --pure, --output-tensor-type, --token-embedding-type, --tensor-type,
    --leave-output-tensor, --override-kv (``kv_overrides``: key -> value, set in the output after the copied
    metadata; an int is written as u32, as llama_model_quantize writes it) and --imatrix: ``imatrix_file``
    as the tool takes it (its vectors, plus the four ``quantize.imatrix.*`` keys), or ``imatrix``, a mapping
    tensor name -> float32 importance per column, passed alone (no keys).
    """
    llama_cpp = _llama_cpp()
    if imatrix_file is not None:
        if imatrix is not None:
            raise ValueError("give imatrix or imatrix_file, not both")
        imatrix, imatrix_keys = _load_imatrix_as_llama_quantize(imatrix_file)
        kv_overrides = [*kv_overrides, *imatrix_keys]
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
    if kv_overrides:
        kvs = (llama_cpp.llama_model_kv_override * (len(kv_overrides) + 1))()  # zeroed: the last has an empty key
        for i, (key, value) in enumerate(kv_overrides):
            _set_kv_override(llama_cpp, kvs[i], key, value)
        params.kv_overrides = kvs
        keep_alive.append(kvs)

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


def _set_kv_override(llama_cpp, override, key: str, value: KVValue) -> None:
    encoded_key = key.encode()
    if not 0 < len(encoded_key) <= _KV_OVERRIDE_BYTES:
        raise ValueError(f"kv override key {key!r}: 1 to {_KV_OVERRIDE_BYTES} bytes")
    override.key = encoded_key
    if isinstance(value, bool):
        override.tag, override.value.val_bool = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_BOOL, value
    elif isinstance(value, int):
        override.tag, override.value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, value
    elif isinstance(value, float):
        override.tag, override.value.val_f64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_FLOAT, value
    else:  # strncpy(val_str, value, 127), as quantize.cpp fills it
        text = value if isinstance(value, bytes) else value.encode()
        override.tag, override.value.val_str = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, text[:_KV_OVERRIDE_BYTES]


def _load_imatrix_as_llama_quantize(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], list[tuple[str, KVValue]]]:
    """What llama-quantize's main() makes of ``--imatrix path`` (tools/quantize/quantize.cpp, load_imatrix and the
    kv overrides after it): the importance vectors, and quantize.imatrix.file (the path as given),
    .dataset (the first recorded dataset, when there is one), .entries_count (every entry of the file) and
    .chunks_count (when positive, as an int holds it)."""
    from llmquant.gguf_io.imatrix import importance_vectors, read_imatrix

    data = read_imatrix(path)
    if not data.is_legacy:
        _require_imatrix_metadata(path)
    keys: list[tuple[str, KVValue]] = [("quantize.imatrix.file", os.fsencode(path))]
    if data.datasets:
        keys.append(("quantize.imatrix.dataset", data.datasets[0].encode()))
    keys.append(("quantize.imatrix.entries_count", len(data.entries)))
    if 0 < data.chunk_count < 1 << 31:  # m_last_call > 0, an int holding the file's u32 chunk count
        keys.append(("quantize.imatrix.chunks_count", data.chunk_count))
    return importance_vectors(data), keys


def _require_imatrix_metadata(path: str | os.PathLike) -> None:
    """llama-quantize refuses a GGUF imatrix without imatrix.datasets, .chunk_count and .chunk_size."""
    import gguf

    fields = gguf.GGUFReader(str(path)).fields
    missing = [k for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size") if k not in fields]
    if missing:
        raise ValueError(f"{path}: llama-quantize refuses it (load_imatrix: missing imatrix metadata {missing})")


__all__ = ["LlamaQuantizeError", "QuantizeResult", "llama_quantize"]
