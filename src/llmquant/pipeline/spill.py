"""Named byte arrays kept in one scratch file instead of in memory.

A calibrated method makes every decoder linear's bytes before the file is written; held in memory they would
be the whole quantized model (tens of GB for a large one), which the layer-by-layer runner exists to avoid.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, MutableMapping
from pathlib import Path

import numpy as np


class SpilledBytes(MutableMapping[str, np.ndarray]):
    """A mapping name -> uint8 array whose values live in ``path`` (created, appended to, deleted on close).
    A value is read back from the file each time it is looked up; replacing one leaves its old bytes unused."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._file = open(self.path, "w+b")  # noqa: SIM115 - held open for the store's life, closed by close()
        self._index: dict[str, tuple[int, int]] = {}  # name -> (offset, n_bytes)

    def __setitem__(self, name: str, data: np.ndarray) -> None:
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        offset = self._file.seek(0, os.SEEK_END)
        self._file.write(memoryview(raw))
        self._index[name] = (offset, raw.nbytes)

    def __getitem__(self, name: str) -> np.ndarray:
        offset, n_bytes = self._index[name]
        self._file.flush()
        out = np.empty(n_bytes, dtype=np.uint8)
        read = os.preadv(self._file.fileno(), [memoryview(out)], offset) if n_bytes else 0
        if read != n_bytes:
            raise OSError(f"{self.path}: read {read} of {n_bytes} bytes of {name}")
        return out

    def __delitem__(self, name: str) -> None:
        del self._index[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> SpilledBytes:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


__all__ = ["SpilledBytes"]
