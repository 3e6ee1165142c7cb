"""Importance-matrix files, byte-compatible with llama.cpp's ``llama-imatrix`` and ``llama-quantize``.

Two formats, as llama.cpp's tools/imatrix/imatrix.cpp writes them and common/imatrix-loader.cpp reads them:

* GGUF (the default since 2025): per weight matrix ``<name>.in_sum2`` (F32, ggml shape ``[n_cols, n_mat]``: the
  sum over tokens of each input column's squared activation, one row per expert) and ``<name>.counts`` (F32, ggml
  shape ``[1, n_mat]``: tokens seen per expert), sorted by name; metadata ``general.type = imatrix``,
  ``imatrix.datasets``, ``imatrix.chunk_count``, ``imatrix.chunk_size`` and nothing else.
* the legacy ``.dat``: int32 entry count; per entry int32 name length, name, int32 ``ncall``, int32 ``nval`` and
  ``nval`` float32 values already normalised as ``sum / count * ncall``; then optionally int32 chunk count and
  the dataset name.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmquant.errors import InputError

IN_SUM2_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"
KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
GGUF_MAGIC = b"GGUF"
# what llama-quantize records of the imatrix in every file it quantizes with one (tools/quantize/quantize.cpp)
KEY_QUANTIZE_FILE = "quantize.imatrix.file"
KEY_QUANTIZE_DATASET = "quantize.imatrix.dataset"
KEY_QUANTIZE_N_ENTRIES = "quantize.imatrix.entries_count"
KEY_QUANTIZE_N_CHUNKS = "quantize.imatrix.chunks_count"
# llama-quantize passes its strings in a llama_model_kv_override, whose val_str holds 127 bytes and a NUL
_KV_OVERRIDE_STR_BYTES = 127


@dataclass
class ImatrixEntry:
    """One weight matrix's statistics: ``sums[m, j]`` = sum of x_j² over the tokens that matrix ``m`` saw.

    ``n_mat`` is 1 for a dense matrix and the number of experts for a stacked MoE tensor. In a legacy ``.dat``
    file ``sums`` holds ``mean * ncall`` and ``counts`` holds ``[ncall]`` (as llama.cpp's loader keeps them).
    """

    sums: np.ndarray  # float32 [n_mat, n_cols]
    counts: np.ndarray  # int64 [n_mat]

    @property
    def n_cols(self) -> int:
        return int(self.sums.shape[1])

    @property
    def n_mat(self) -> int:
        return int(self.sums.shape[0])


@dataclass
class ImatrixData:
    """The contents of an imatrix file, in either format."""

    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    is_legacy: bool = False


@dataclass(frozen=True)
class ImatrixProvenance:
    """Where a quantized file's importance matrix came from: the ``quantize.imatrix.*`` keys of the file.

    ``file`` and ``dataset`` are the bytes written (None: the key is absent); ``n_chunks`` is written only when
    positive, as llama-quantize writes it."""

    file: bytes | None
    dataset: bytes | None
    n_entries: int
    n_chunks: int

    def metadata(self) -> list[tuple[str, bytes | int]]:
        """The keys in llama-quantize's order; strings as bytes, counts as llama_model_quantize writes them (u32)."""
        keys: list[tuple[str, bytes | int]] = []
        if self.file is not None:
            keys.append((KEY_QUANTIZE_FILE, self.file))
        if self.dataset is not None:
            keys.append((KEY_QUANTIZE_DATASET, self.dataset))
        keys.append((KEY_QUANTIZE_N_ENTRIES, self.n_entries))
        if self.n_chunks > 0:
            keys.append((KEY_QUANTIZE_N_CHUNKS, self.n_chunks))
        return keys

    def describe(self, chunk_tokens: int | None = None) -> str:
        """``wiki.txt, 100 chunks of 512 tokens, 210 entries``: the dataset and counts, for a summary line."""
        parts = [self.dataset.decode("utf-8", "replace")] if self.dataset else []
        if self.n_chunks > 0:
            of = f" of {chunk_tokens} tokens" if chunk_tokens else ""
            parts.append(f"{self.n_chunks} chunk" + ("" if self.n_chunks == 1 else "s") + of)
        parts.append(f"{self.n_entries} entr" + ("y" if self.n_entries == 1 else "ies"))
        return ", ".join(parts)


def provenance_of_file(path_as_given: str, data: ImatrixData) -> ImatrixProvenance:
    """What ``llama-quantize --imatrix path_as_given`` writes of ``data`` (quantize.cpp's main): the path as
    typed and the first recorded dataset, each cut to 127 bytes; every entry of the file counted; its chunk
    count (only when positive)."""
    dataset = data.datasets[0].encode()[:_KV_OVERRIDE_STR_BYTES] if data.datasets else None
    chunks = data.chunk_count if data.chunk_count < 1 << 31 else 0  # llama-quantize holds it in an int
    return ImatrixProvenance(os.fsencode(path_as_given)[:_KV_OVERRIDE_STR_BYTES], dataset, len(data.entries),
                             chunks)


def provenance_of_calibration(datasets: Sequence[str], n_entries: int, n_chunks: int) -> ImatrixProvenance:
    """An importance matrix computed on the fly (``--calib``): no file; every source named, in order."""
    return ImatrixProvenance(None, ", ".join(datasets).encode(), n_entries, n_chunks)


def write_imatrix_gguf(path: str | os.PathLike, data: ImatrixData) -> Path:
    """Write ``data`` as llama-imatrix's GGUF file (IMatrixCollector::save_imatrix)."""
    import gguf

    path = Path(path)
    # gguf-py's writer insists on an architecture key; imatrix.cpp writes none, so it is dropped again below
    writer = gguf.GGUFWriter(str(path), arch="imatrix")
    for shard in writer.kv_data:
        shard.pop(gguf.Keys.General.ARCHITECTURE, None)
    writer.add_type(gguf.GGUFType.IMATRIX)
    writer.add_array(KEY_DATASETS, list(data.datasets))
    writer.add_uint32(KEY_CHUNK_COUNT, int(data.chunk_count))
    writer.add_uint32(KEY_CHUNK_SIZE, int(data.chunk_size))
    for name in sorted(data.entries):  # "deterministic tensor name order", as imatrix.cpp sorts
        entry = data.entries[name]
        sums = np.ascontiguousarray(entry.sums, dtype=np.float32).reshape(entry.n_mat, entry.n_cols)
        counts = np.asarray(entry.counts, dtype=np.float32).reshape(entry.n_mat, 1)
        # numpy [n_mat, n_cols] is ggml ne = [n_cols, n_mat]; counts [n_mat, 1] is ne = [1, n_mat]
        writer.add_tensor(name + IN_SUM2_SUFFIX, sums)
        writer.add_tensor(name + COUNTS_SUFFIX, counts)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_imatrix_dat(path: str | os.PathLike, data: ImatrixData) -> Path:
    """Write ``data`` in llama.cpp's legacy ``.dat`` layout (IMatrixCollector::save_imatrix_legacy)."""
    path = Path(path)
    chunk_size = max(int(data.chunk_size), 1)
    stored = []
    for name in sorted(data.entries):
        entry = data.entries[name]
        if not np.any(entry.counts > 0):  # "entry has no data - skipping", as save_imatrix_legacy
            continue
        stored.append(name)
    out = bytearray(struct.pack("<i", len(stored)))
    for name in stored:
        entry = data.entries[name]
        encoded = name.encode()
        # ceiling division "to avoid accidental zeros"
        ncall = (int(entry.counts.max()) + chunk_size - 1) // chunk_size
        counts = entry.counts.astype(np.float32)[:, None]
        sums = entry.sums.astype(np.float32)
        values = np.where(counts > 0, sums / np.where(counts > 0, counts, 1), 1.0) * np.float32(ncall)
        out += struct.pack("<i", len(encoded)) + encoded + struct.pack("<ii", ncall, values.size)
        out += values.astype("<f4").tobytes()
    dataset = (data.datasets[-1] if data.datasets else "").encode()
    out += struct.pack("<ii", int(data.chunk_count), len(dataset)) + dataset
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(out))
    return path


def read_imatrix(path: str | os.PathLike) -> ImatrixData:
    """Read an imatrix file: llama.cpp's GGUF format, or else its legacy ``.dat`` (as common_imatrix_load)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such imatrix file")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic == GGUF_MAGIC:
        return _read_gguf(path)
    return _read_dat(path)


def importance_vectors(data: ImatrixData) -> dict[str, np.ndarray]:
    """Per tensor, the mean squared activation of each input column, as llama-quantize's load_imatrix makes it.

    A MoE tensor's vector is its experts' vectors one after another (length ``n_cols * n_expert``); an expert
    that saw no token gets ones, and a legacy entry is divided by its ``ncall``.
    """
    vectors: dict[str, np.ndarray] = {}
    for name, entry in data.entries.items():
        sums = entry.sums.astype(np.float32)
        if data.is_legacy:
            ncall = int(entry.counts[0]) if entry.counts.size else 0
            vectors[name] = (sums / ncall if ncall > 0 else sums).reshape(-1)
            continue
        counts = entry.counts.astype(np.float32)[:, None]
        safe = np.where(counts > 0, counts, 1.0)
        vectors[name] = np.where(counts > 0, sums / safe, 1.0).astype(np.float32).reshape(-1)
    return vectors


def load_importance(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an imatrix file (either format) and return tensor name -> mean squared activation per column."""
    return importance_vectors(read_imatrix(path))


def imatrix_data_from_sums(sums: Mapping[str, np.ndarray], counts: Mapping[str, np.ndarray],
                           datasets: Sequence[str], chunk_size: int) -> ImatrixData:
    """Build the file contents from collected sums; chunk_count as imatrix.cpp's m_last_chunk (max count // size)."""
    entries = {
        name: ImatrixEntry(np.asarray(sums[name], dtype=np.float32).reshape(len(counts[name]), -1),
                           np.asarray(counts[name], dtype=np.int64).reshape(-1))
        for name in sums
    }
    max_count = max((int(e.counts.max()) for e in entries.values() if e.counts.size), default=0)
    return ImatrixData(entries, list(datasets), max_count // chunk_size if chunk_size else 0, chunk_size)


def _read_gguf(path: Path) -> ImatrixData:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError/struct errors/IndexError on damaged files
        raise InputError(f"{path}: not a readable GGUF imatrix file ({exc})") from None
    fields = reader.fields
    datasets: list[str] = []
    if KEY_DATASETS in fields:
        datasets = [str(v) for v in fields[KEY_DATASETS].contents()]
    chunk_count = int(fields[KEY_CHUNK_COUNT].contents()) if KEY_CHUNK_COUNT in fields else 0
    chunk_size = int(fields[KEY_CHUNK_SIZE].contents()) if KEY_CHUNK_SIZE in fields else 0

    pairs: dict[str, dict[str, object]] = {}
    for tensor in reader.tensors:
        for suffix in (IN_SUM2_SUFFIX, COUNTS_SUFFIX):
            if tensor.name.endswith(suffix):
                pairs.setdefault(tensor.name[: -len(suffix)], {})[suffix] = tensor
    if not pairs:
        raise InputError(f"{path}: a GGUF file with no imatrix data (no '*.in_sum2' / '*.counts' tensors)")
    entries: dict[str, ImatrixEntry] = {}
    for name, pair in sorted(pairs.items()):
        if len(pair) != 2:
            missing = COUNTS_SUFFIX if IN_SUM2_SUFFIX in pair else IN_SUM2_SUFFIX
            raise InputError(f"{path}: tensor {name}{missing} is missing (each entry needs .in_sum2 and .counts)")
        sums_t, counts_t = pair[IN_SUM2_SUFFIX], pair[COUNTS_SUFFIX]
        for t in (sums_t, counts_t):
            if t.tensor_type != gguf.GGMLQuantizationType.F32:
                raise InputError(f"{path}: tensor {t.name} is {t.tensor_type.name}; imatrix tensors must be F32")
        counts = np.rint(np.asarray(counts_t.data, dtype=np.float64).reshape(-1)).astype(np.int64)  # std::lround
        sums = np.asarray(sums_t.data, dtype=np.float32).reshape(-1)
        if counts.size == 0 or sums.size % counts.size:
            raise InputError(f"{path}: {name} has {sums.size} sums for {counts.size} counts (not a multiple)")
        entries[name] = ImatrixEntry(sums.reshape(counts.size, -1).copy(), counts)
    return ImatrixData(entries, datasets, chunk_count, chunk_size, is_legacy=False)


def _read_dat(path: Path) -> ImatrixData:
    raw = path.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(raw):
            raise InputError(f"{path}: truncated legacy imatrix file (neither GGUF nor a complete .dat) at byte {pos}")
        values = struct.unpack_from(fmt, raw, pos)
        pos += size
        return values

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise InputError(f"{path}: not an imatrix file (neither GGUF nor llama.cpp's legacy .dat with entries)")
    entries: dict[str, ImatrixEntry] = {}
    for _ in range(n_entries):
        (name_len,) = take("<i")
        if not 0 < name_len < 4096:
            raise InputError(f"{path}: not an imatrix file (bad entry name length {name_len})")
        name = take(f"<{name_len}s")[0].decode("utf-8", errors="replace")
        ncall, nval = take("<ii")
        if nval < 1:
            raise InputError(f"{path}: entry {name} has {nval} values")
        values = np.array(take(f"<{nval}f"), dtype=np.float32)
        entries[name] = ImatrixEntry(values.reshape(1, -1), np.array([ncall], dtype=np.int64))
    chunk_count, datasets = 0, []
    if pos + 4 <= len(raw):  # the trailing chunk count and dataset name are optional
        (chunk_count,) = take("<i")
        if pos + 4 <= len(raw):
            (length,) = take("<i")
            if 0 < length <= len(raw) - pos:
                datasets.append(take(f"<{length}s")[0].decode("utf-8", errors="replace"))
    return ImatrixData(entries, datasets, chunk_count, 0, is_legacy=True)
