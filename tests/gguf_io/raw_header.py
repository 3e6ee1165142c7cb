"""A minimal GGUF header parser written from the spec, independent of the gguf package: a second opinion."""

from __future__ import annotations

import struct
from pathlib import Path

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def read_tensor_table(path: Path) -> tuple[dict, list[tuple[str, list[int], int]]]:
    """(metadata scalars, [(tensor name, dims ne0-first, ggml type id)])."""
    data = Path(path).read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        value = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return value[0]

    def string() -> str:
        nonlocal pos
        n = take("Q")
        s = data[pos:pos + n].decode("utf-8", errors="replace")
        pos += n
        return s

    def value(vtype: int):
        if vtype == _STRING:
            return string()
        if vtype == _ARRAY:
            sub, n = take("I"), take("Q")
            return [value(sub) for _ in range(n)]
        return take(_SCALARS[vtype])

    assert data[:4] == b"GGUF"
    pos = 4
    take("I")  # version
    n_tensors, n_kv = take("Q"), take("Q")
    meta = {}
    for _ in range(n_kv):
        key = string()
        meta[key] = value(take("I"))
    tensors = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("Q") for _ in range(take("I"))]
        ttype = take("I")
        take("Q")  # offset
        tensors.append((name, dims, ttype))
    return meta, tensors
