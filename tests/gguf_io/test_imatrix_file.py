"""The imatrix file formats, against the layout llama.cpp's tools/imatrix/imatrix.cpp writes."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest

from llmquant.errors import InputError
from llmquant.gguf_io.imatrix import (
    ImatrixData,
    ImatrixEntry,
    importance_vectors,
    load_importance,
    read_imatrix,
    write_imatrix_dat,
    write_imatrix_gguf,
)


def _sample() -> ImatrixData:
    rng = np.random.default_rng(0)
    entries = {
        "blk.1.ffn_down.weight": ImatrixEntry(rng.random((1, 48), dtype=np.float32) * 100, np.array([256])),
        "blk.0.attn_q.weight": ImatrixEntry(rng.random((1, 32), dtype=np.float32) * 100, np.array([256])),
        # an expert that saw no token (count 0), as happens with MoE models on little text
        "blk.0.ffn_up_exps.weight": ImatrixEntry(rng.random((3, 32), dtype=np.float32), np.array([100, 0, 412])),
    }
    entries["blk.0.ffn_up_exps.weight"].sums[1] = 0
    return ImatrixData(entries, ["wiki.train.raw", "chat.jsonl"], chunk_count=2, chunk_size=128)


def _write_dat_like_imatrix_cpp(path, entries: dict[str, tuple[int, np.ndarray]], chunks: int, dataset: str) -> None:
    """save_imatrix_legacy's layout, written independently of our writer: values are already sum/count*ncall."""
    with open(path, "wb") as out:
        out.write(struct.pack("<i", len(entries)))
        for name, (ncall, values) in entries.items():
            out.write(struct.pack("<i", len(name)) + name.encode())
            out.write(struct.pack("<ii", ncall, values.size) + values.astype("<f4").tobytes())
        out.write(struct.pack("<ii", chunks, len(dataset)) + dataset.encode())


def test_gguf_round_trips_through_our_reader(tmp_path):
    data = _sample()
    back = read_imatrix(write_imatrix_gguf(tmp_path / "imatrix.gguf", data))
    assert not back.is_legacy
    assert (back.datasets, back.chunk_count, back.chunk_size) == (data.datasets, 2, 128)
    assert set(back.entries) == set(data.entries)
    for name, entry in data.entries.items():
        np.testing.assert_array_equal(back.entries[name].sums, entry.sums)
        assert back.entries[name].counts.tolist() == entry.counts.tolist()


def test_gguf_layout_follows_imatrix_cpp(tmp_path):
    data = _sample()
    reader = gguf.GGUFReader(write_imatrix_gguf(tmp_path / "imatrix.gguf", data))
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert keys == ["general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]
    assert reader.fields["general.type"].contents() == "imatrix"
    assert reader.fields["imatrix.datasets"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING]
    assert reader.fields["imatrix.chunk_count"].types == [gguf.GGUFValueType.UINT32]
    assert reader.fields["imatrix.chunk_size"].types == [gguf.GGUFValueType.UINT32]
    # save_imatrix: entries sorted by name, each as .in_sum2 then .counts, all F32
    expected_order = [f"{name}{suffix}" for name in sorted(data.entries) for suffix in (".in_sum2", ".counts")]
    assert [t.name for t in reader.tensors] == expected_order
    for tensor in reader.tensors:
        entry = data.entries[tensor.name.rsplit(".", 1)[0]]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        # ggml ne: in_sum2 = [n_cols, n_mat] (ggml_new_tensor_2d(nval / nmat, nmat)), counts = [1, n_mat]
        expected_ne = [entry.n_cols, entry.n_mat] if tensor.name.endswith(".in_sum2") else [1, entry.n_mat]
        assert tensor.shape.tolist() == expected_ne
        values = entry.sums if tensor.name.endswith(".in_sum2") else entry.counts.astype(np.float32)
        np.testing.assert_array_equal(np.asarray(tensor.data).reshape(-1), values.reshape(-1))


def test_importance_is_mean_square_per_expert_with_ones_for_unseen_experts():
    data = _sample()
    vectors = importance_vectors(data)
    moe = data.entries["blk.0.ffn_up_exps.weight"]
    expected = np.concatenate([moe.sums[0] / 100, np.ones(32), moe.sums[2] / 412])  # as llama-quantize's loader
    np.testing.assert_allclose(vectors["blk.0.ffn_up_exps.weight"], expected, rtol=1e-6)
    np.testing.assert_allclose(vectors["blk.0.attn_q.weight"], data.entries["blk.0.attn_q.weight"].sums[0] / 256)


def test_reads_legacy_dat_as_llama_cpp_writes_it(tmp_path):
    rng = np.random.default_rng(1)
    means = {"blk.0.attn_k.weight": rng.random(32, dtype=np.float32), "blk.0.ffn_gate_exps.weight":
             rng.random(64, dtype=np.float32)}
    path = tmp_path / "imatrix.dat"
    _write_dat_like_imatrix_cpp(path, {name: (5, mean * 5) for name, mean in means.items()}, 5, "wiki.train.raw")
    data = read_imatrix(path)
    assert data.is_legacy and data.datasets == ["wiki.train.raw"] and data.chunk_count == 5
    vectors = load_importance(path)
    for name, mean in means.items():
        np.testing.assert_allclose(vectors[name], mean, rtol=1e-6)


def test_our_dat_writer_writes_imatrix_cpp_bytes(tmp_path):
    data = _sample()
    ours = write_imatrix_dat(tmp_path / "ours.dat", data)
    expected = {}
    for name in sorted(data.entries):
        entry = data.entries[name]
        ncall = -(-int(entry.counts.max()) // data.chunk_size)  # ceiling division, as save_imatrix_legacy
        counts = entry.counts[:, None].astype(np.float32)
        # "store 1 for partial data": an expert with no tokens gets value 1, count 1
        means = np.where(counts > 0, entry.sums / np.maximum(counts, 1), 1.0)
        expected[name] = (ncall, (means * ncall).astype(np.float32))
    _write_dat_like_imatrix_cpp(tmp_path / "ref.dat", expected, data.chunk_count, data.datasets[-1])
    assert ours.read_bytes() == (tmp_path / "ref.dat").read_bytes()


def test_a_file_that_is_no_imatrix_is_an_input_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is not an imatrix")
    with pytest.raises(InputError, match="notes.txt"):
        read_imatrix(path)
    with pytest.raises(InputError, match="no such imatrix file"):
        read_imatrix(tmp_path / "missing.gguf")
