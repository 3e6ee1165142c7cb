"""A fast look at a GGUF's header: metadata and the tensor table, without gguf-py's per-field parsing.

    header = read_gguf_header("model.gguf")
    header.metadata["llama.block_count"], header.tensors[0].name, header.tensors[0].type_name

gguf-py's GGUFReader takes seconds on a file with a 50k-token vocabulary; this reads only the header
(through mmap, so the tensor data is never touched) and takes a fraction of that. Each tensor's absolute
offset and byte size let a caller read any part of its data (``read_tensor_bytes``), checked against the file's
length.
"""

from __future__ import annotations

import functools
import mmap
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from llmquant.errors import InputError

_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY_DTYPES = {value_type: np.dtype("<" + fmt) for value_type, fmt in _SCALAR_FORMATS.items()}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class HeaderTensor:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    type_name: str  # "F32", "Q4_K", … (or "TYPE_<id>" for a type gguf-py does not know)
    offset: int = 0  # absolute byte offset of the tensor's data in the file
    n_bytes: int = 0  # bytes of data (0 for a type gguf-py does not know)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, Any]  # arrays of numbers as lists, arrays of strings as StringArray (a lazy list of str)
    tensors: list[HeaderTensor]
    # each key's value type, and for arrays the item type: what GGUFWriter.add_key_value needs to copy it
    value_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]]
    file_size: int = 0
    # each key's value as the file encodes it (type, then value): copied verbatim into a new file, a vocabulary
    # needs no re-encoding
    raw_values: dict[str, bytes] = field(default_factory=dict)

    def read_tensor_bytes(self, tensor: HeaderTensor, start: int, stop: int, out: np.ndarray | None = None
                          ) -> np.ndarray:
        """Bytes ``[start, stop)`` of the tensor's data, read from the file (into ``out``, a uint8 buffer of at
        least ``stop - start`` bytes, when given; the returned array is then a view of it). Read, not mapped:
        streaming a model this way keeps the process's memory at the size of its buffers, however large the
        file. Threads may read at once (the GIL is released while reading)."""
        if not 0 <= start <= stop <= tensor.n_bytes:
            raise ValueError(f"{tensor.name}: bytes [{start}, {stop}) are outside its {tensor.n_bytes}")
        n = stop - start
        data = np.empty(n, dtype=np.uint8) if out is None else out.reshape(-1)[:n]
        view = memoryview(data)
        done = 0
        with open(self.path, "rb", buffering=0) as file:
            file.seek(tensor.offset + start)
            while done < n:
                got = file.readinto(view[done:])
                if not got:
                    raise InputError(f"{self.path}: the file ended inside tensor {tensor.name} (was it truncated "
                                     "while being read?)")
                done += got
        return data


class StringArray(Sequence):
    """A GGUF array of strings (a vocabulary), decoded to ``str`` only when first read: copying a file's
    metadata never needs the 50k strings themselves. Compares equal to a list of the same strings."""

    def __init__(self, encoded: bytes, count: int) -> None:
        self._encoded = encoded  # count × (u64 length, utf-8 bytes)
        self._count = count

    @functools.cached_property
    def _items(self) -> list[str]:
        encoded, pos = self._encoded, 0
        read_length = struct.Struct("<Q").unpack_from
        items = []
        for _ in range(self._count):
            (length,) = read_length(encoded, pos)
            items.append(encoded[pos + 8:pos + 8 + length].decode("utf-8", errors="replace"))
            pos += 8 + length
        return items

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index):  # noqa: ANN001 - int or slice, as list's
        return self._items[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StringArray):
            return self._items == other._items
        return isinstance(other, Sequence) and not isinstance(other, (str, bytes)) and self._items == list(other)

    __hash__ = None  # mutable-sequence semantics, as list

    def __repr__(self) -> str:
        return f"StringArray({self._count} strings)"


class _Cursor:
    def __init__(self, buffer: mmap.mmap, path: Path) -> None:
        self.buffer = buffer
        self.pos = 0
        self.path = path

    def take(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from("<" + fmt, self.buffer, self.pos)
        except struct.error:
            raise InputError(f"{self.path}: GGUF header is truncated at byte {self.pos}") from None
        self.pos += struct.calcsize("<" + fmt)
        return value

    def string(self) -> str:
        length = self.take("Q")
        raw = self.buffer[self.pos : self.pos + length]
        if len(raw) != length:
            raise InputError(f"{self.path}: GGUF header is truncated at byte {self.pos}")
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def strings(self, count: int) -> StringArray:
        """``count`` strings in a row (a vocabulary): one tight loop over their lengths, bounds checked once at
        the end; the strings are decoded when first read."""
        buffer, start, size = self.buffer, self.pos, len(self.buffer)
        read_length = struct.Struct("<Q").unpack_from
        pos = start
        try:
            for _ in range(count):
                pos += 8 + read_length(buffer, pos)[0]
        except struct.error:
            pos = size + 1
        if pos > size:
            raise InputError(f"{self.path}: GGUF header is truncated at byte {self.pos}")
        self.pos = pos
        return StringArray(buffer[start:pos], count)

    def value(self, value_type: int) -> Any:
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count = self.take("I"), self.take("Q")
            if item_type in _NUMPY_DTYPES:  # numbers: one slice, no per-item parsing
                dtype = _NUMPY_DTYPES[item_type]
                items = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.pos)
                self.pos += count * dtype.itemsize
                return items.tolist()
            if item_type == _STRING:
                return self.strings(count)
            return [self.value(item_type) for _ in range(count)]
        if value_type not in _SCALAR_FORMATS:
            raise InputError(f"{self.path}: unknown GGUF value type {value_type} at byte {self.pos}")
        return self.take(_SCALAR_FORMATS[value_type])


def _type_name(type_id: int) -> str:
    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"TYPE_{type_id}"


def _n_bytes(type_id: int, shape: tuple[int, ...]) -> int:
    try:
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        return 0
    n_elements = int(np.prod(shape)) if shape else 1
    return n_elements // block_size * type_size


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Metadata and tensor table of the GGUF at ``path``; a clear InputError for anything that is not GGUF."""
    path = Path(path)
    try:
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            if buffer[:4] != b"GGUF":
                raise InputError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
            cursor = _Cursor(buffer, path)
            cursor.pos = 4
            version = cursor.take("I")
            n_tensors, n_kv = cursor.take("Q"), cursor.take("Q")
            metadata = {}
            value_types = {}
            raw_values = {}
            for _ in range(n_kv):
                key = cursor.string()
                value_start = cursor.pos
                value_type = cursor.take("I")
                item_type = None
                if value_type == _ARRAY:  # peek at the item type; value() reads it again
                    item_type = GGUFValueType(struct.unpack_from("<I", buffer, cursor.pos)[0])
                metadata[key] = cursor.value(value_type)
                value_types[key] = (GGUFValueType(value_type), item_type)
                raw_values[key] = buffer[value_start:cursor.pos]
            table = []
            for _ in range(n_tensors):
                name = cursor.string()
                shape = tuple(cursor.take("Q") for _ in range(cursor.take("I")))
                type_id = cursor.take("I")
                table.append((name, shape, type_id, cursor.take("Q")))  # offset relative to the data section
            alignment = int(metadata.get("general.alignment", 32)) or 32
            data_start = -(-cursor.pos // alignment) * alignment
            file_size = len(buffer)
            tensors = []
            for name, shape, type_id, relative in table:
                tensor = HeaderTensor(name, shape, _type_name(type_id), data_start + relative, _n_bytes(type_id, shape))
                if tensor.offset + tensor.n_bytes > file_size:
                    raise InputError(f"{path}: truncated: tensor {name} needs bytes up to "
                                     f"{tensor.offset + tensor.n_bytes}, the file has {file_size}")
                tensors.append(tensor)
    except (OSError, ValueError) as error:  # missing, unreadable or empty (mmap refuses empty files)
        raise InputError(f"{path}: cannot read GGUF header: {error}") from error
    return GGUFHeader(path=path, version=version, metadata=metadata, tensors=tensors, value_types=value_types,
                      file_size=file_size, raw_values=raw_values)


__all__ = ["GGUFHeader", "HeaderTensor", "StringArray", "read_gguf_header"]
