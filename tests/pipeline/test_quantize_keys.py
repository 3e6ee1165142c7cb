"""`llmquant quantize --imatrix FILE` writes the file `llama-quantize --imatrix FILE` writes, byte for byte: its
``quantize.imatrix.*`` keys (path as given, first dataset, entries, chunks) included, for either imatrix format.
Every file type on the tiny model and Q4_K_M, IQ4_XS, Q2_K on SmolLM2 are compared whole in test_quantize.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from llmquant.cli import cli
from llmquant.gguf_io.imatrix import write_imatrix_dat, write_imatrix_gguf
from llmquant.oracles.llama_quantize import llama_quantize
from llmquant.pipeline.quantize import format_results, quantize_model
from tests.oracles.test_llama_quantize_oracle import imatrix_of, metadata, tiny_model


@pytest.fixture(scope="module")
def tiny_src(test_cache: Path, smollm2_f32_gguf: Path) -> Path:
    return tiny_model(test_cache, smollm2_f32_gguf)


def test_smollm2_q8_0_is_llama_quantizes_whole_file(smollm2_f32_gguf, tmp_path):
    imatrix_file = write_imatrix_gguf(tmp_path / "imatrix.gguf", imatrix_of(smollm2_f32_gguf, ["wiki.txt"], 8))
    ours = quantize_model(smollm2_f32_gguf, tmp_path / "ours.gguf", "Q8_0", imatrix_file=imatrix_file)[0]
    theirs = llama_quantize(smollm2_f32_gguf, tmp_path / "theirs.gguf", "Q8_0", imatrix_file=imatrix_file).output
    assert ours.path.read_bytes() == theirs.read_bytes()
    assert metadata(ours.path)["quantize.imatrix.dataset"] == "wiki.txt"


def test_a_legacy_dat_imatrix_gives_llama_quantizes_whole_file(tiny_src, tmp_path):
    data = imatrix_of(tiny_src, ["calibration_datav3.txt"], chunk_count=125, skip=5)
    imatrix_file = write_imatrix_dat(tmp_path / "imatrix.dat", data)
    ours = quantize_model(tiny_src, tmp_path / "ours.gguf", "Q4_0", imatrix_file=imatrix_file)[0]
    theirs = llama_quantize(tiny_src, tmp_path / "theirs.gguf", "Q4_0", imatrix_file=imatrix_file).output
    assert ours.path.read_bytes() == theirs.read_bytes()
    assert ours.recorded["quantize.imatrix.chunks_count"] == 125


def test_the_path_is_recorded_as_typed_on_the_command_line(tiny_src, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_imatrix_gguf(tmp_path / "imatrix.gguf", imatrix_of(tiny_src, ["a.txt", "b.txt"], chunk_count=3))
    result = CliRunner().invoke(cli, ["quantize", str(tiny_src), "-o", "ours.gguf", "--type", "Q8_0",
                                      "--imatrix", "./imatrix.gguf"])
    assert result.exit_code == 0, result.output
    theirs = llama_quantize(tiny_src, tmp_path / "theirs.gguf", "Q8_0", imatrix_file="./imatrix.gguf").output
    assert (tmp_path / "ours.gguf").read_bytes() == theirs.read_bytes()
    assert metadata(theirs)["quantize.imatrix.file"] == "./imatrix.gguf"
    assert "importance matrix: ./imatrix.gguf (a.txt, 3 chunks of 512 tokens," in result.output


def test_a_path_over_127_bytes_is_cut_as_llama_quantize_cuts_it(tiny_src, tmp_path):
    folder = tmp_path / ("d" * 60) / ("é" * 40)
    folder.mkdir(parents=True)
    imatrix_file = write_imatrix_gguf(folder / "imatrix.gguf", imatrix_of(tiny_src, ["x"], chunk_count=0))
    ours = quantize_model(tiny_src, tmp_path / "ours.gguf", "Q8_0", imatrix_file=imatrix_file)[0]
    theirs = llama_quantize(tiny_src, tmp_path / "theirs.gguf", "Q8_0", imatrix_file=imatrix_file).output
    assert ours.path.read_bytes() == theirs.read_bytes()
    assert "quantize.imatrix.chunks_count" not in ours.recorded  # a chunk count of 0 is not written


def test_the_summary_names_the_imatrix_dataset_chunks_and_entries(tiny_src, tmp_path):
    data = imatrix_of(tiny_src, ["wiki.txt"], chunk_count=4)
    imatrix_file = write_imatrix_gguf(tmp_path / "imatrix.gguf", data)
    result = quantize_model(tiny_src, tmp_path / "ours.gguf", "Q8_0", imatrix_file=imatrix_file)[0]
    assert f"importance matrix: {imatrix_file} (wiki.txt, 4 chunks of 512 tokens, {len(data.entries)} entries)" \
        in format_results([result])
