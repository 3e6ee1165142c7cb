"""A model folder's weights, one tensor at a time: safetensors (single or sharded), or opted-in pickled .bin files.

Every shard's header is checked against its size before anything is converted, so a truncated download fails at
once with the file's name rather than half-way through. Tensors are read by opening their shard for that one
tensor (safetensors maps the file; closing unmaps it), so resident memory stays near the largest tensor.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from llmquant.errors import InputError

_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    shape: tuple[int, ...]
    dtype: str


class WeightSource:
    """Name → (file, shape, dtype) for every tensor of a model folder; ``load(name)`` reads one tensor."""

    def __init__(self, entries: dict[str, TensorEntry], pickled: bool = False):
        self.entries = entries
        self.pickled = pickled

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def load(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        if self.pickled:
            return load_pickled_weights(entry.file)[name].clone()
        from safetensors import safe_open

        try:
            with safe_open(str(entry.file), framework="pt") as f:
                return f.get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise InputError(f"{entry.file}: cannot read tensor '{name}' ({exc}); re-download the file") from None


def open_weights(folder: Path, allow_pickle: bool = False) -> WeightSource:
    """The weights of ``folder``: model.safetensors, sharded safetensors with an index, or (opted in) .bin files."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = _files_from_index(index)
    else:
        files = sorted(folder.glob("*.safetensors"))
    if files:
        entries: dict[str, TensorEntry] = {}
        for file in files:
            for name, entry in read_safetensors_header(file).items():
                if name in entries:
                    raise InputError(f"{file}: tensor '{name}' also appears in {entries[name].file.name}")
                entries[name] = entry
        return WeightSource(entries)

    pickled = sorted(p for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES and p.is_file())
    if pickled:
        if not allow_pickle:
            names = ", ".join(p.name for p in pickled[:3])
            raise InputError(
                f"{folder}: only pickled PyTorch weights ({names}); unpickling can run code, so they are refused. "
                "Convert them to safetensors, or pass --allow-pickle if you trust the files"
            )
        return _pickled_source(pickled)
    raise InputError(f"{folder}: no weights found (expected model.safetensors or model-*-of-*.safetensors)")


def read_safetensors_header(file: Path) -> dict[str, TensorEntry]:
    """The tensors a safetensors file declares, after checking that the file holds all of their bytes."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{file}: truncated ({size} bytes, not even a safetensors header); re-download it")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > 100_000_000:
            raise InputError(f"{file}: truncated or not a safetensors file (header claims {header_len} bytes, "
                             f"file has {size}); re-download it")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{file}: corrupt safetensors header ({exc}); re-download it") from None
    data_bytes = size - 8 - header_len
    entries: dict[str, TensorEntry] = {}
    needed = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype")
        if dtype not in _SAFETENSORS_DTYPES:
            raise InputError(f"{file}: tensor '{name}' has dtype {dtype}; only F32, F16 and BF16 weights are supported")
        needed = max(needed, int(info["data_offsets"][1]))
        entries[name] = TensorEntry(file=file, shape=tuple(int(n) for n in info["shape"]), dtype=dtype)
    if needed > data_bytes:
        raise InputError(f"{file}: truncated: its tensors need {needed} bytes of data but only {data_bytes} are there; "
                         "re-download the file")
    return entries


def _files_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"{index}: corrupt shard index ({exc!r}); re-download it") from None
    files = []
    for name in dict.fromkeys(weight_map.values()):
        path = index.parent / name
        if not path.is_file():
            raise InputError(f"{path}: missing shard listed in {index.name}; download all shards")
        files.append(path)
    return files


def load_pickled_weights(file: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict through torch's weights_only loader, which builds tensors and plain containers
    only: a pickle that would build any other object (run code) is refused, with one line, even when pickles
    are allowed. Memory-mapped where the file is in torch's zip format, so the tensors stay on disk."""
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on the way to refusing them
            warnings.simplefilter("ignore")
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                state = torch.load(file, map_location="cpu", weights_only=True)  # the legacy format is not mapped
    except pickle.UnpicklingError:
        raise InputError(f"{file}: refused: the pickle holds more than tensors (unpickling it could run code); "
                         "convert the weights to safetensors from a trusted copy") from None
    except OSError:
        raise
    except Exception as exc:  # torch raises several types for damaged or foreign files
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise InputError(f"{file}: cannot read pickled weights ({type(exc).__name__}: {first_line}); re-download "
                         "the file") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise InputError(f"{file}: not a state dict of tensors; give the model's weights file")
    return state


def _pickled_source(files: list[Path]) -> WeightSource:
    entries: dict[str, TensorEntry] = {}
    for file in files:
        state = load_pickled_weights(file)
        for name, tensor in state.items():
            entries[name] = TensorEntry(file=file, shape=tuple(tensor.shape), dtype=str(tensor.dtype))
    return WeightSource(entries, pickled=True)
