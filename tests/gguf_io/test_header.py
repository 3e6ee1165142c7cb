"""The fast header reader agrees with gguf-py's GGUFReader, field by field and tensor by tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from llmquant.errors import InputError
from llmquant.gguf_io.header import StringArray, read_gguf_header


def test_header_matches_gguf_reader(smollm2_f32_gguf: Path) -> None:
    header = read_gguf_header(smollm2_f32_gguf)
    reader = GGUFReader(smollm2_f32_gguf, "r")
    expected_tensors = [(t.name, tuple(int(d) for d in t.shape), t.tensor_type.name) for t in reader.tensors]
    assert [(t.name, t.shape, t.type_name) for t in header.tensors] == expected_tensors
    expected_metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert header.metadata.keys() == expected_metadata.keys()
    for key, value in expected_metadata.items():
        assert (
            header.metadata[key] == pytest.approx(value) if isinstance(value, float) else header.metadata[key] == value
        )


def test_header_of_a_non_gguf_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "not.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(InputError, match="not a GGUF file"):
        read_gguf_header(path)


def test_header_of_an_empty_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(InputError, match="cannot read GGUF header"):
        read_gguf_header(path)


def test_tensor_bytes_are_gguf_readers(smollm2_f32_gguf: Path) -> None:
    header = read_gguf_header(smollm2_f32_gguf)
    reader = GGUFReader(smollm2_f32_gguf, "r")
    assert len(header.tensors) == len(reader.tensors)
    for ours, theirs in zip(header.tensors, reader.tensors, strict=True):
        assert ours.offset == theirs.data_offset
        assert ours.n_bytes == theirs.n_bytes
        assert ours.n_elements == int(theirs.n_elements)
        assert np.array_equal(header.read_tensor_bytes(ours, 0, ours.n_bytes),
                              np.asarray(theirs.data).view(np.uint8).reshape(-1))


def test_part_of_a_tensor_is_read_into_a_given_buffer(smollm2_f32_gguf: Path) -> None:
    header = read_gguf_header(smollm2_f32_gguf)
    tensor = next(t for t in header.tensors if t.name == "blk.0.ffn_down.weight")
    whole = header.read_tensor_bytes(tensor, 0, tensor.n_bytes)
    buffer = np.zeros(1 << 20, dtype=np.uint8)
    part = header.read_tensor_bytes(tensor, 1000, 5000, out=buffer)
    assert np.shares_memory(part, buffer)
    assert np.array_equal(part, whole[1000:5000])
    with pytest.raises(ValueError, match="outside"):
        header.read_tensor_bytes(tensor, 0, tensor.n_bytes + 1)


def test_a_file_cut_short_after_its_header_was_read_is_a_clear_error(smollm2_f32_gguf: Path, tmp_path: Path) -> None:
    path = tmp_path / "shrinking.gguf"
    path.write_bytes(smollm2_f32_gguf.read_bytes())
    header = read_gguf_header(path)
    last = max(header.tensors, key=lambda t: t.offset)
    with open(path, "r+b") as file:
        file.truncate(last.offset + 10)
    with pytest.raises(InputError, match=f"ended inside tensor {last.name}"):
        header.read_tensor_bytes(last, 0, last.n_bytes)


def test_header_of_a_truncated_file_names_the_tensor(smollm2_f32_gguf: Path, tmp_path: Path) -> None:
    header = read_gguf_header(smollm2_f32_gguf)
    last = max(header.tensors, key=lambda t: t.offset)
    path = tmp_path / "truncated.gguf"
    with open(smollm2_f32_gguf, "rb") as src:
        path.write_bytes(src.read(last.offset + last.n_bytes - 1))
    with pytest.raises(InputError, match=f"truncated: tensor {last.name}"):
        read_gguf_header(path)


def test_header_cut_inside_the_vocabulary_is_a_clear_error(smollm2_f32_gguf: Path, tmp_path: Path) -> None:
    path = tmp_path / "cut.gguf"
    with open(smollm2_f32_gguf, "rb") as src:
        path.write_bytes(src.read(300_000))  # inside tokenizer.ggml.tokens / merges
    with pytest.raises(InputError, match="truncated"):
        read_gguf_header(path)


def test_vocabulary_is_decoded_only_when_read(smollm2_f32_gguf: Path) -> None:
    header = read_gguf_header(smollm2_f32_gguf)
    tokens = header.metadata["tokenizer.ggml.tokens"]
    assert isinstance(tokens, StringArray)
    assert "_items" not in vars(tokens)  # nothing decoded by reading the header
    expected = GGUFReader(smollm2_f32_gguf, "r").fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == len(expected)
    assert tokens[5] == expected[5] and tokens[-3:] == expected[-3:] and list(tokens) == expected
