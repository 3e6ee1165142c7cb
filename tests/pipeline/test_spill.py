"""SpilledBytes: a method's tensors kept in a scratch file, read back exactly."""

from __future__ import annotations

import numpy as np

from llmquant.pipeline.spill import SpilledBytes


def test_values_read_back_byte_for_byte_in_any_order(tmp_path):
    rng = np.random.default_rng(0)
    values = {f"blk.{i}.ffn_down.weight": rng.integers(0, 256, size=n, dtype=np.uint8)
              for i, n in enumerate([1, 4096, 0, 77777])}
    values["blk.0.attn_norm.weight"] = rng.standard_normal(576).astype(np.float32)  # any dtype, kept as bytes
    with SpilledBytes(tmp_path / "store") as store:
        for name, data in values.items():
            store[name] = data
        assert set(store) == set(values) and len(store) == len(values)
        for name in reversed(list(values)):
            expected = values[name].view(np.uint8).reshape(-1)
            got = store[name]
            assert got.dtype == np.uint8 and np.array_equal(got, expected)


def test_values_live_in_the_file_not_in_memory(tmp_path):
    data = np.arange(1 << 20, dtype=np.uint32).view(np.uint8)
    with SpilledBytes(tmp_path / "store") as store:
        store["t"] = data
        data[:] = 0  # the caller's array is free to change or go: the store has its own copy on disk
        assert (tmp_path / "store").stat().st_size == data.nbytes
        assert np.array_equal(store["t"], np.arange(1 << 20, dtype=np.uint32).view(np.uint8))


def test_a_replaced_value_reads_as_the_new_one(tmp_path):
    with SpilledBytes(tmp_path / "store") as store:
        store["t"] = np.zeros(8, np.uint8)
        store["t"] = np.full(3, 7, np.uint8)
        assert np.array_equal(store["t"], np.full(3, 7, np.uint8)) and len(store) == 1


def test_closing_deletes_the_scratch_file(tmp_path):
    store = SpilledBytes(tmp_path / "store")
    store["t"] = np.ones(16, np.uint8)
    store.close()
    assert not (tmp_path / "store").exists()
    store.close()  # twice is harmless
