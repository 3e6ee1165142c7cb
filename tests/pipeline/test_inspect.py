"""`llmquant inspect`: tensor table, totals, metadata, and one-line errors on damaged files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from llmquant.cli import cli
from tests.gguf_io.raw_header import read_tensor_table


def run_cli(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_inspect_lists_all_272_tensors_with_their_types(smollm2_gguf: Path):
    result = run_cli("inspect", str(smollm2_gguf), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    _, raw = read_tensor_table(smollm2_gguf)
    assert report["n_tensors"] == len(raw) == 272
    for entry, (name, dims, type_id) in zip(report["tensors"], raw, strict=True):
        assert entry["name"] == name
        assert entry["shape"] == dims
        assert entry["type"] == GGMLQuantizationType(type_id).name
        block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
        n = 1
        for d in dims:
            n *= d
        assert entry["bytes"] == n // block * nbytes


def test_inspect_reports_key_metadata_and_bits_per_weight(smollm2_gguf: Path):
    report = json.loads(run_cli("inspect", str(smollm2_gguf), "--json").output)
    meta, raw = read_tensor_table(smollm2_gguf)
    key = report["key_metadata"]
    assert key["architecture"] == meta["general.architecture"] == "llama"
    assert key["block_count"] == meta["llama.block_count"] == 30
    assert key["context_length"] == meta["llama.context_length"]
    assert key["tokenizer_model"] == meta["tokenizer.ggml.model"]
    assert key["file_type"] == "Q4_1"
    total_bytes = sum(t["bytes"] for t in report["tensors"])
    total_elems = sum(t["elements"] for t in report["tensors"])
    assert report["bits_per_weight"] == pytest.approx(8 * total_bytes / total_elems)
    assert 4.0 < report["bits_per_weight"] < 6.0  # Q4_1 is 5 bits; norms (F32) add a little
    assert sum(v["tensors"] for v in report["totals_by_type"].values()) == 272


def test_inspect_table_is_readable(smollm2_gguf: Path):
    result = run_cli("inspect", str(smollm2_gguf))
    assert result.exit_code == 0
    assert "blk.0.attn_q.weight" in result.output
    assert "bits per weight" in result.output
    assert "Q4_1" in result.output


def test_inspect_accepts_the_demo_model_name():
    result = run_cli("inspect", "smollm2-135m", "--no-tensors")
    assert result.exit_code == 0, result.output
    assert "272 tensors" in result.output
    assert "blk.0.attn_q.weight" not in result.output


def _run_cli_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmquant", *args], capture_output=True, text=True, timeout=120)


def _assert_one_line_error(proc: subprocess.CompletedProcess, path: Path, *words: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert str(path) in lines[0]
    for word in words:
        assert word in lines[0]


def test_inspect_truncated_file_is_a_one_line_error(smollm2_gguf: Path, tmp_path: Path):
    data = smollm2_gguf.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    _assert_one_line_error(_run_cli_process("inspect", str(truncated)), truncated, "truncated")


def test_inspect_header_cut_short_is_a_one_line_error(smollm2_gguf: Path, tmp_path: Path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm2_gguf.read_bytes()[:5000])  # inside the vocabulary arrays
    _assert_one_line_error(_run_cli_process("inspect", str(cut)), cut)


def test_inspect_non_gguf_file_is_a_one_line_error(tmp_path: Path):
    bogus = tmp_path / "weights.safetensors"
    bogus.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    _assert_one_line_error(_run_cli_process("inspect", str(bogus)), bogus, "not a GGUF file")


def test_inspect_empty_and_missing_files_are_one_line_errors(tmp_path: Path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _assert_one_line_error(_run_cli_process("inspect", str(empty)), empty)
    missing = tmp_path / "missing.gguf"
    _assert_one_line_error(_run_cli_process("inspect", str(missing)), missing)


def test_inspect_corrupt_header_is_a_one_line_error(smollm2_gguf: Path, tmp_path: Path):
    corrupt = tmp_path / "corrupt.gguf"
    shutil.copy(smollm2_gguf, corrupt)
    with corrupt.open("r+b") as f:
        f.seek(8)
        f.write(b"\xff" * 16)  # absurd tensor and key counts
    _assert_one_line_error(_run_cli_process("inspect", str(corrupt)), corrupt)


def test_inspect_shows_where_llama_quantizes_imatrix_came_from(test_cache: Path, smollm2_f32_gguf: Path,
                                                              tmp_path: Path):
    from llmquant.gguf_io.imatrix import write_imatrix_gguf
    from llmquant.oracles.llama_quantize import llama_quantize
    from tests.oracles.test_llama_quantize_oracle import imatrix_of, tiny_model

    model = tiny_model(test_cache, smollm2_f32_gguf)
    data = imatrix_of(model, ["wiki.train.raw"], chunk_count=7)
    imatrix_file = write_imatrix_gguf(tmp_path / "imatrix.gguf", data)
    out = llama_quantize(model, tmp_path / "q.gguf", "Q8_0", imatrix_file=imatrix_file).output
    result = run_cli("inspect", str(out), "--no-tensors")
    assert result.exit_code == 0, result.output
    shown = {line.split()[0]: line.split(maxsplit=1)[1] for line in result.output.splitlines()
             if line.strip().startswith("quantize.")}
    assert shown == {"quantize.imatrix.file": str(imatrix_file), "quantize.imatrix.dataset": "wiki.train.raw",
                     "quantize.imatrix.entries_count": str(len(data.entries)), "quantize.imatrix.chunks_count": "7"}
    report = json.loads(run_cli("inspect", str(out), "--json", "--no-tensors").output)
    assert report["metadata"]["quantize.imatrix.chunks_count"] == 7
