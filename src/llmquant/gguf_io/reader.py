"""Open and summarise GGUF files with llama.cpp's ``gguf`` package, turning every failure into a clear error."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, LlamaFileType

from llmquant.errors import InputError

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order (ne0 first: the row length), as llama.cpp prints it
    type_name: str
    n_elements: int
    n_bytes: int


@dataclass
class GGUFSummary:
    path: Path
    file_size: int
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    key_metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.tensor_bytes / self.n_elements if self.n_elements else 0.0

    def totals_by_type(self) -> dict[str, dict[str, int]]:
        totals: dict[str, dict[str, int]] = {}
        for t in self.tensors:
            entry = totals.setdefault(t.type_name, {"tensors": 0, "elements": 0, "bytes": 0})
            entry["tensors"] += 1
            entry["elements"] += t.n_elements
            entry["bytes"] += t.n_bytes
        return dict(sorted(totals.items(), key=lambda kv: -kv[1]["bytes"]))

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "file_size": self.file_size,
            "gguf_version": self.version,
            "key_metadata": self.key_metadata,
            "n_tensors": len(self.tensors),
            "n_elements": self.n_elements,
            "tensor_bytes": self.tensor_bytes,
            "bits_per_weight": self.bits_per_weight,
            "totals_by_type": self.totals_by_type(),
            "tensors": [
                {"name": t.name, "shape": list(t.shape), "type": t.type_name, "elements": t.n_elements,
                 "bytes": t.n_bytes}
                for t in self.tensors
            ],
            "metadata": self.metadata,
        }


def file_type_name(value: int | None) -> str | None:
    """llama.cpp's name for a ``general.file_type`` value: ``Q4_K_M``, ``F16``, ``Q4_1``…"""
    if value is None:
        return None
    try:
        name = LlamaFileType(int(value)).name
    except ValueError:
        return f"unknown ({value})"
    for prefix in ("MOSTLY_", "ALL_"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


def open_gguf(path: str | os.PathLike) -> GGUFReader:
    """A ``GGUFReader`` over ``path`` after checking it is a whole GGUF file; ``InputError`` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        if len(magic) < 4:
            raise InputError(f"{path}: not a GGUF file (only {size} bytes)")
        raise InputError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        reader = GGUFReader(path, "r")
    except Exception as exc:  # the gguf package raises assorted errors on a damaged header
        raise InputError(f"{path}: corrupt or truncated GGUF header ({type(exc).__name__}: {exc})") from None
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise InputError(
                f"{path}: truncated: tensor '{tensor.name}' needs bytes up to {end} but the file has {size}"
            )
    return reader


def field_value(reader: GGUFReader, key: str) -> Any:
    """The Python value of a metadata field (``None`` when absent)."""
    f = reader.fields.get(key)
    if f is None:
        return None
    return _field_contents(f)


def _field_contents(f: Any) -> Any:
    if not f.types:
        return None
    main = f.types[0]
    if main == GGUFValueType.ARRAY:
        sub = f.types[-1] if len(f.types) > 1 else None
        if sub == GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8", errors="replace") for i in f.data]
        return [_scalar(f.parts[i]) for i in f.data]
    if main == GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8", errors="replace")
    return _scalar(f.parts[f.data[0]])


def _scalar(part: np.ndarray) -> Any:
    value = part.tolist()
    if isinstance(value, list):
        value = value[0] if len(value) == 1 else value
    return value


def _short(value: Any, limit: int = 8) -> Any:
    """Metadata for display: long arrays (vocabularies, merges) are summarised."""
    if isinstance(value, list) and len(value) > limit:
        return f"[{len(value)} items]"
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + "…"
    return value


def summarize_gguf(path: str | os.PathLike) -> GGUFSummary:
    """Read a GGUF file's header and tensor table into a ``GGUFSummary``."""
    path = Path(path)
    reader = open_gguf(path)
    tensors = []
    for t in reader.tensors:
        qtype = GGMLQuantizationType(int(t.tensor_type))
        block_size, bytes_per_block = GGML_QUANT_SIZES[qtype]
        n_elements = int(t.n_elements)
        tensors.append(
            TensorInfo(
                name=t.name,
                shape=tuple(int(d) for d in t.shape),
                type_name=qtype.name,
                n_elements=n_elements,
                n_bytes=n_elements // block_size * bytes_per_block,
            )
        )
    metadata = {key: _short(_field_contents(f)) for key, f in reader.fields.items() if not key.startswith("GGUF.")}
    arch = field_value(reader, "general.architecture")
    key_metadata = {
        "architecture": arch,
        "name": field_value(reader, "general.name"),
        "file_type": file_type_name(field_value(reader, "general.file_type")),
        "context_length": field_value(reader, f"{arch}.context_length") if arch else None,
        "embedding_length": field_value(reader, f"{arch}.embedding_length") if arch else None,
        "block_count": field_value(reader, f"{arch}.block_count") if arch else None,
        "tokenizer_model": field_value(reader, "tokenizer.ggml.model"),
        "tokenizer_pre": field_value(reader, "tokenizer.ggml.pre"),
        "quantization_version": field_value(reader, "general.quantization_version"),
    }
    version = field_value(reader, "GGUF.version")
    return GGUFSummary(
        path=path,
        file_size=path.stat().st_size,
        version=int(version) if version is not None else 0,
        metadata=metadata,
        tensors=tensors,
        key_metadata=key_metadata,
    )
