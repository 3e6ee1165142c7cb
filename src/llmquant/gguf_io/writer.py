"""Writing a GGUF one tensor at a time on top of ``gguf.GGUFWriter``, complete or not at all.

The header, metadata and tensor table are written first from declared shapes and types; then each tensor's
bytes follow in the declared order, whole or in consecutive parts, so only a part of one tensor needs to be in
memory. Metadata values read from another GGUF can be copied as their encoded bytes (``add_raw``). The file is
written under a temporary name beside the target and renamed when the last tensor is in; any error removes it.
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np


def tensor_nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    """Bytes of a tensor of ``shape`` (PyTorch order, rows last) in ggml type ``qtype``."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_weights = int(np.prod(shape)) if shape else 1
    return n_weights // block_size * type_size


_NUMPY_ITEM_TYPES = {
    gguf.GGUFValueType.UINT8: "<u1", gguf.GGUFValueType.INT8: "<i1", gguf.GGUFValueType.UINT16: "<u2",
    gguf.GGUFValueType.INT16: "<i2", gguf.GGUFValueType.UINT32: "<u4", gguf.GGUFValueType.INT32: "<i4",
    gguf.GGUFValueType.FLOAT32: "<f4", gguf.GGUFValueType.UINT64: "<u8", gguf.GGUFValueType.INT64: "<i8",
    gguf.GGUFValueType.FLOAT64: "<f8",
}


class _Encoded(bytes):
    """A metadata value already encoded as GGUF stores it (its type, then the value)."""


class _GGUFWriter(gguf.GGUFWriter):
    """GGUFWriter with the same bytes, packing long arrays (a vocabulary's tokens and merges) in one go
    instead of one Python call per item, and writing already-encoded values as they are."""

    def _pack_val(self, val: Any, vtype: gguf.GGUFValueType, add_vtype: bool,
                  sub_type: gguf.GGUFValueType | None = None) -> bytes:
        if isinstance(val, _Encoded):
            return bytes(val) if add_vtype else bytes(val)[4:]
        if vtype != gguf.GGUFValueType.ARRAY or sub_type is None or not isinstance(val, (list, tuple)) or not val:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        head = (struct.pack("<I", vtype) if add_vtype else b"") + struct.pack("<IQ", sub_type, len(val))
        if sub_type == gguf.GGUFValueType.STRING and all(isinstance(item, str) for item in val):
            pack_length = struct.Struct("<Q").pack
            return head + b"".join(pack_length(len(item)) + item for item in (s.encode("utf-8") for s in val))
        if sub_type in _NUMPY_ITEM_TYPES:
            return head + np.asarray(val, dtype=_NUMPY_ITEM_TYPES[sub_type]).tobytes()
        return super()._pack_val(val, vtype, add_vtype, sub_type)


class StreamingGGUFWriter:
    """``declare`` every tensor, ``begin``, then ``write`` each tensor's bytes in order; ``finish`` renames."""

    def __init__(self, path: Path, arch: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".partial", dir=self.path.parent)
        os.close(fd)
        self.tmp_path = Path(tmp)
        self.writer = _GGUFWriter(self.tmp_path, arch)
        self._declared: list[tuple[str, int]] = []
        self._next = 0
        self._written = 0  # bytes of the current tensor written so far

    def __enter__(self) -> StreamingGGUFWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def add(self, key: str, value: Any) -> None:
        """One metadata value through GGUFWriter's ``add_<key>`` (which prefixes architecture keys)."""
        getattr(self.writer, f"add_{key}")(value)

    def add_raw(self, key: str, encoded: bytes) -> None:
        """One metadata value as another GGUF encodes it (``GGUFHeader.raw_values``): its 4-byte type, then the
        value. Copied verbatim, so a 50k-token vocabulary costs one bytes copy."""
        if len(encoded) < 4:
            raise ValueError(f"{key}: an encoded GGUF value starts with its 4-byte type")
        vtype = gguf.GGUFValueType(int.from_bytes(encoded[:4], "little"))
        self.writer.add_key_value(key, _Encoded(encoded), vtype)

    def add_string_bytes(self, key: str, value: bytes) -> None:
        """A string value given as its bytes, written as they are (a C string cut mid-character stays cut)."""
        self.add_raw(key, struct.pack("<IQ", gguf.GGUFValueType.STRING, len(value)) + value)

    def declare(self, name: str, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> None:
        nbytes = tensor_nbytes(shape, qtype)
        # GGUFWriter stores shapes as given for raw types; it reverses them into ggml order itself
        self.writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        self._declared.append((name, nbytes))

    def begin(self) -> None:
        self.writer.write_header_to_file(path=self.tmp_path)
        self.writer.write_kv_data_to_file()
        self.writer.write_ti_data_to_file()

    def write(self, name: str, data: np.ndarray) -> None:
        """The next declared tensor's bytes, whole or the next part of them (parts in order, any sizes)."""
        if self._next >= len(self._declared):
            raise RuntimeError(f"tensor {name} written after all {len(self._declared)} declared tensors")
        expected_name, nbytes = self._declared[self._next]
        if name != expected_name or self._written + data.nbytes > nbytes:
            raise RuntimeError(f"tensor {name} ({self._written} + {data.nbytes} bytes) written where {expected_name} "
                               f"({nbytes} bytes) was declared")
        fout = self.writer.fout[0]
        if self._written == 0:  # the data section and every tensor start aligned
            self.writer.write_padding(fout, fout.tell())
        fout.write(memoryview(np.ascontiguousarray(data)).cast("B"))
        self._written += data.nbytes
        if self._written == nbytes:
            self.writer.write_padding(fout, nbytes)
            self._next += 1
            self._written = 0

    def finish(self) -> Path:
        if self._next != len(self._declared):
            raise RuntimeError(f"only {self._next} of {len(self._declared)} declared tensors were written")
        self.writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp_path, 0o666 & ~umask)  # mkstemp made it private; the finished file is an ordinary one
        os.replace(self.tmp_path, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self.writer.close()
        except Exception:  # the file may never have been opened; removing it is what matters
            pass
        self.tmp_path.unlink(missing_ok=True)
