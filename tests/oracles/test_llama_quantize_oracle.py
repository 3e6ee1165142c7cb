"""The llama_model_quantize oracle behaves as the `llama-quantize` tool: ``imatrix_file`` writes the four
``quantize.imatrix.*`` keys as tools/quantize/quantize.cpp fills its kv overrides, and llama_model_quantize puts
them after the copied metadata (each a u32 or a string); ``kv_overrides`` is its --override-kv."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import numpy as np
import pytest

from llmquant.gguf_io.header import read_gguf_header
from llmquant.gguf_io.imatrix import ImatrixData, imatrix_data_from_sums, write_imatrix_dat, write_imatrix_gguf
from llmquant.oracles.llama_quantize import llama_quantize
from tests.gguf_fixtures import small_vocab_tokenizer_gguf
from tests.recipes.conftest import TINY_LLAMA, write_tiny_llama_gguf

IMATRIX_KEYS = ["quantize.imatrix.file", "quantize.imatrix.dataset", "quantize.imatrix.entries_count",
                "quantize.imatrix.chunks_count"]


@pytest.fixture(scope="module")
def tiny_src(test_cache: Path, smollm2_f32_gguf: Path) -> Path:
    return tiny_model(test_cache, smollm2_f32_gguf)


def tiny_model(test_cache: Path, smollm2_f32_gguf: Path) -> Path:
    """tests/pipeline/test_quantize.py's tiny model (16 layers, hidden 256), from the same cache."""
    tokenizer = small_vocab_tokenizer_gguf(smollm2_f32_gguf, test_cache / "smollm2-tokenizer-512.gguf")
    config = dataclasses.replace(TINY_LLAMA, name="tiny-llama-v512")
    return write_tiny_llama_gguf(config, tokenizer, test_cache / f"{config.name}.gguf")


def imatrix_of(model: Path, datasets: list[str], chunk_count: int, skip: int = 0) -> ImatrixData:
    """Every matrix of ``model`` but the first ``skip``, from chunks of 512 tokens."""
    widths = {t.name: int(t.shape[0]) for t in read_gguf_header(model).tensors if len(t.shape) >= 2}
    names = list(widths)[skip:]
    rng = np.random.default_rng(0)
    sums = {n: rng.uniform(1.0, 4.0, size=(1, widths[n])).astype(np.float32) * 512 * chunk_count for n in names}
    counts = {n: np.full((1,), 512 * chunk_count, dtype=np.float32) for n in names}
    return imatrix_data_from_sums(sums, counts, datasets, chunk_size=512)


def metadata(path: Path) -> dict[str, object]:
    """The file's KV pairs in the file's order (read fast: SmolLM2's vocabulary is not parsed)."""
    return read_gguf_header(path).metadata


def value_type(path: Path, key: str) -> gguf.GGUFValueType:
    return read_gguf_header(path).value_types[key][0]


def test_imatrix_file_writes_llama_quantizes_four_keys_last(tiny_src, tmp_path):
    data = imatrix_of(tiny_src, ["wiki.train.raw", "chat.jsonl"], chunk_count=6, skip=3)
    imatrix_file = write_imatrix_gguf(tmp_path / "imatrix.gguf", data)
    out = llama_quantize(tiny_src, tmp_path / "q.gguf", "Q8_0", imatrix_file=str(imatrix_file)).output
    found = metadata(out)
    assert list(found)[-5:] == ["general.file_type", *IMATRIX_KEYS]
    assert found["quantize.imatrix.file"] == str(imatrix_file)
    assert found["quantize.imatrix.dataset"] == "wiki.train.raw"  # the first dataset only
    assert found["quantize.imatrix.entries_count"] == len(data.entries)
    assert found["quantize.imatrix.chunks_count"] == 6
    assert [value_type(out, k) for k in IMATRIX_KEYS] == [gguf.GGUFValueType.STRING] * 2 + \
        [gguf.GGUFValueType.UINT32] * 2


def test_a_legacy_dat_gives_its_trailing_dataset_and_chunk_count(tiny_src, tmp_path):
    data = imatrix_of(tiny_src, ["calibration_datav3.txt"], chunk_count=125)
    imatrix_file = write_imatrix_dat(tmp_path / "imatrix.dat", data)
    found = metadata(llama_quantize(tiny_src, tmp_path / "q.gguf", "Q8_0", imatrix_file=imatrix_file).output)
    assert found["quantize.imatrix.dataset"] == "calibration_datav3.txt"
    assert found["quantize.imatrix.chunks_count"] == 125
    assert found["quantize.imatrix.entries_count"] == len(data.entries)


def test_a_long_path_is_cut_to_127_bytes_and_no_chunk_count_means_no_key(tiny_src, tmp_path):
    folder = tmp_path / ("d" * 60) / ("é" * 40)  # two-byte characters: the cut may fall inside one
    folder.mkdir(parents=True)
    imatrix_file = write_imatrix_gguf(folder / "imatrix.gguf", imatrix_of(tiny_src, ["x"], chunk_count=0))
    out = llama_quantize(tiny_src, tmp_path / "q.gguf", "Q8_0", imatrix_file=imatrix_file).output
    header = read_gguf_header(out)
    written = bytes(header.raw_values["quantize.imatrix.file"][12:])  # after the value type and length
    assert written == str(imatrix_file).encode()[:127]
    assert "quantize.imatrix.chunks_count" not in header.metadata
    assert list(header.metadata)[-1] == "quantize.imatrix.entries_count"


def test_kv_overrides_replace_a_key_and_go_last_with_ints_as_u32(tiny_src, tmp_path):
    out = llama_quantize(tiny_src, tmp_path / "q.gguf", "Q8_0",
                         kv_overrides=[("general.name", "renamed"), ("test.count", -3), ("test.flag", True)]).output
    found = metadata(out)
    assert list(found)[-3:] == ["general.name", "test.count", "test.flag"]
    assert found["general.name"] == "renamed"
    assert value_type(out, "test.count") == gguf.GGUFValueType.UINT32 and found["test.count"] == 3
    assert found["test.flag"] is True
