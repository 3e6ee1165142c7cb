"""The low-bit i-quants' codeword grids, as data, and the tables ggml derives from them at start-up.

``iq_grids.npz`` (package data) holds ggml-common.h's tables as the dequantizers read them: each grid
``int8 [n_codewords, width]`` (``iq2xxs_grid`` … ``iq1s_grid``, one byte per weight) and ``ksigns_iq2xs``.
Regenerate it from a llama.cpp checkout with::

    python -m llmquant.formats.iq_grids /path/to/llama.cpp

which also checks the grids against the compact tables that ggml-quants.c's searches start from
(``kgrid_2bit_256`` …, ``kgrid_256`` …): the same codewords in the same order.

What ggml's searches use is derived here once per process (``functools.cache``), as ``iq2xs_init_impl`` and
``iq3xs_init_impl`` do: the codewords as odd positions ``2·l + 1`` of their level indices ``l``, the map from
every packed level pattern to its codeword (or to its neighbour list), and the neighbour lists.
"""

from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmquant.formats.search import kernel

DATA_FILE = Path(__file__).with_name("iq_grids.npz")

# grid name in the data file -> (ggml-common.h table, bytes per codeword)
GRID_TABLES = {
    "iq2xxs": ("iq2xxs_grid", 8),
    "iq2xs": ("iq2xs_grid", 8),
    "iq2s": ("iq2s_grid", 8),
    "iq3xxs": ("iq3xxs_grid", 4),
    "iq3s": ("iq3s_grid", 4),
    "iq1s": ("iq1s_grid", 8),
}
# ggml-quants.c's compact tables of the same grids (level l of weight i in bits [b·i, b·(i+1)))
_COMPACT_TABLES = {
    "iq2xxs": ("kgrid_2bit_256", 2), "iq2xs": ("kgrid_2bit_512", 2), "iq2s": ("kgrid_2bit_1024", 2),
    "iq1s": ("kgrid_1bit_2048", 2), "iq3xxs": ("kgrid_256", 3), "iq3s": ("kgrid_512", 3),
}  # fmt: skip
# how many distinct distances of neighbours ggml keeps per off-grid point (nwant in iq2xs_init_impl/iq3xs_init_impl)
_NEIGHBOUR_DISTANCES = {"iq2xxs": 2, "iq2xs": 2, "iq2s": 1, "iq1s": 3, "iq3xxs": 2, "iq3s": 3}


@dataclass(frozen=True)
class CodewordGrid:
    """One grid as ggml's search and dequantizer see it.

    ``values``: int8 ``[n, width]``, the dequantizer's bytes (ggml-common.h). ``levels``: the level index of
    each byte (its rank among the grid's distinct values). ``positions``: ``2·levels + 1``, the search's
    codewords. ``index_map`` (ggml's kmap): for each packed level pattern ``Σ l_i << bits·i`` the codeword
    index, or ``-(offset + 1)`` where ``neighbours[offset]`` counts the neighbours listed after it."""

    values: np.ndarray
    levels: np.ndarray
    positions: np.ndarray
    bits: int
    index_map: np.ndarray
    neighbours: np.ndarray

    @property
    def width(self) -> int:
        return self.values.shape[1]

    @functools.cached_property
    def odd_positions(self) -> np.ndarray:
        """float32 ``[n, width]``: each codeword's ``2l + 1``, what the IQ2/IQ3 searches fit a scale to."""
        return self.positions.astype(np.float32)

    def level_values(self, values_of_levels: np.ndarray) -> np.ndarray:
        """float32 ``[n, width]``: each codeword with its levels read through ``values_of_levels``."""
        return np.ascontiguousarray(np.asarray(values_of_levels, dtype=np.float32)[self.levels])


@functools.cache
def _data() -> dict[str, np.ndarray]:
    with np.load(DATA_FILE) as data:
        return {name: data[name] for name in data.files}


def sign_table() -> np.ndarray:
    """ggml's ksigns_iq2xs: uint8 [128], the 7 stored sign bits completed with an even-parity 8th."""
    return _data()["ksigns_iq2xs"]


@functools.cache
def codeword_grid(name: str) -> CodewordGrid:
    """The grid ``name`` (a key of GRID_TABLES) with ggml's map and neighbour lists, derived once per process."""
    values = _data()[name]
    distinct = np.unique(values)
    levels = np.searchsorted(distinct, values).astype(np.int8)
    bits = 3 if name.startswith("iq3") else 2
    positions = (2 * levels + 1).astype(np.int8)
    width = values.shape[1]
    map_size = (1 << (bits * width)) if bits == 3 else 43692  # ggml's kmap_size: 4096 and 43692
    index_map = np.full(map_size, -1, dtype=np.int32)
    packed = (levels.astype(np.int64) << (bits * np.arange(width))).sum(axis=1)
    index_map[packed] = np.arange(values.shape[0], dtype=np.int32)
    counts = np.zeros(map_size, dtype=np.int64)
    _count_neighbours(positions, index_map, bits, _NEIGHBOUR_DISTANCES[name], counts, np.empty(0, np.uint16))
    neighbours = np.empty(int((counts + (counts > 0)).sum()), dtype=np.uint16)
    _count_neighbours(positions, index_map, bits, _NEIGHBOUR_DISTANCES[name], counts, neighbours)
    for array in (values, levels, positions, index_map, neighbours):
        array.setflags(write=False)
    return CodewordGrid(values, levels, positions, bits, index_map, neighbours)


@kernel
def _count_neighbours(positions, index_map, bits, n_distances, counts, neighbours):
    """iq2xs_init_impl / iq3xs_init_impl's neighbour lists: for each level pattern not on the grid (levels up
    to 2^bits - 1, positions 2l + 1), every codeword within its ``n_distances`` nearest squared distances, in
    ggml's order (by distance, then codeword index). With an empty ``neighbours`` only ``counts`` is filled;
    otherwise the lists are written and ``index_map`` points at them (a count, then the indices)."""
    n_grid, width = positions.shape
    mask = (1 << bits) - 1
    distance = np.empty(n_grid, dtype=np.int32)
    position = np.empty(width, dtype=np.int32)
    fill = neighbours.shape[0] > 0
    offset = 0
    for i in range(index_map.shape[0]):
        if index_map[i] >= 0:
            continue
        for k in range(width):
            position[k] = 2 * ((i >> (bits * k)) & mask) + 1
        for j in range(n_grid):
            d2 = 0
            for k in range(width):
                diff = positions[j, k] - position[k]
                d2 += diff * diff
            distance[j] = d2
        # the n_distances smallest distinct distances: the lists hold every codeword up to the last of them
        limit = -1
        for _ in range(n_distances):
            next_limit = 1 << 30
            for j in range(n_grid):
                if limit < distance[j] < next_limit:
                    next_limit = distance[j]
            if next_limit == 1 << 30:
                break
            limit = next_limit
        if not fill:
            n = 0
            for j in range(n_grid):
                if distance[j] <= limit:
                    n += 1
            counts[i] = n
            continue
        index_map[i] = -(offset + 1)
        neighbours[offset] = counts[i]
        offset += 1
        previous = -1
        while True:  # the distances in ascending order, each one's codewords by index (ggml's qsort order)
            current = 1 << 30
            for j in range(n_grid):
                if previous < distance[j] < current:
                    current = distance[j]
            if current > limit:
                break
            for j in range(n_grid):
                if distance[j] == current:
                    neighbours[offset] = j
                    offset += 1
            previous = current


# ---- regenerating the data file from llama.cpp's sources ----


def _c_table(source: str, name: str) -> list[int]:
    match = re.search(rf"\b{name}\s*(?:\[[^\]]*\])?\s*(?:=\s*{{|,[^)]*\))(.*?)(?:}};|GGML_TABLE_END)", source, re.S)
    if match is None:
        raise ValueError(f"table {name} not found")
    return [int(token, 0) for token in re.findall(r"0x[0-9a-fA-F]+|\b\d+\b", match.group(1))]


def grids_from_llama_cpp(llama_cpp: Path) -> dict[str, np.ndarray]:
    """ggml-common.h's grids and ksigns, checked against ggml-quants.c's compact tables of the same grids."""
    common = (llama_cpp / "ggml/src/ggml-common.h").read_text()
    quants = (llama_cpp / "ggml/src/ggml-quants.c").read_text()
    out = {"ksigns_iq2xs": np.array(_c_table(common, "ksigns_iq2xs"), dtype=np.uint8)}
    for name, (table, width) in GRID_TABLES.items():
        words = np.array(_c_table(common, table), dtype=np.uint64 if width == 8 else np.uint32)
        values = words.view(np.int8).reshape(-1, width)  # little-endian: byte i is weight i
        compact_name, bits = _COMPACT_TABLES[name]
        compact = np.array(_c_table(quants, compact_name), dtype=np.int64)
        levels = np.searchsorted(np.unique(values), values)
        expected = (compact[:, None] >> (bits * np.arange(width))) & ((1 << bits) - 1)
        if compact.shape[0] != values.shape[0] or not np.array_equal(levels, expected):
            raise ValueError(f"{table} (ggml-common.h) and {compact_name} (ggml-quants.c) disagree")
        out[name] = np.ascontiguousarray(values)
    return out


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python -m llmquant.formats.iq_grids /path/to/llama.cpp")
    grids = grids_from_llama_cpp(Path(argv[0]))
    temporary = DATA_FILE.with_suffix(".tmp.npz")
    np.savez_compressed(temporary, **grids)
    temporary.replace(DATA_FILE)
    print(f"wrote {DATA_FILE} ({DATA_FILE.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv[1:])
