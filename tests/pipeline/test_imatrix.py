"""The imatrix job end to end on the real SmolLM2 model and through the CLI."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from llmquant.cli import cli
from llmquant.errors import InputError
from llmquant.gguf_io.imatrix import load_importance, read_imatrix
from llmquant.pipeline.imatrix import run_imatrix

# the weight matrices of a llama block that llama-quantize quantizes and llama-imatrix collects
BLOCK_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@pytest.fixture(scope="module")
def smollm2_run(smollm2_hf, tmp_path_factory):
    output = tmp_path_factory.mktemp("imatrix") / "smollm2.gguf"
    return run_imatrix(smollm2_hf, (), output, n_ctx=64, n_chunks=3, batch_size=3), output


def test_every_matrix_llama_cpp_quantizes_has_an_entry_of_its_input_width(smollm2_run, smollm2_gguf):
    run, output = smollm2_run
    model = gguf.GGUFReader(smollm2_gguf)
    n_layers = int(model.fields["llama.block_count"].contents())
    widths = {t.name: int(t.shape[0]) for t in model.tensors}  # ggml ne[0]: the input width
    expected = {f"blk.{i}.{m}.weight" for i in range(n_layers) for m in BLOCK_MATRICES}
    data = read_imatrix(output)
    assert set(data.entries) == expected
    for name, entry in data.entries.items():
        assert entry.n_mat == 1 and entry.n_cols == widths[name]  # what llama-quantize checks: ne[0] * ne[2]
        assert entry.counts.tolist() == [3 * 64]
        assert np.all(entry.sums > 0) and np.all(np.isfinite(entry.sums))
    assert (data.chunk_count, data.chunk_size) == (3, 64)
    assert data.datasets == ["builtin:pydoc-topics"]
    assert 1 < run.perplexity < 100  # a real model on English prose, not a random one (vocab ~49k)


def test_library_vectors_are_sums_over_counts(smollm2_run):
    run, output = smollm2_run
    vectors = load_importance(output)
    for name, entry in run.data.entries.items():
        np.testing.assert_allclose(vectors[name], entry.sums[0] / entry.counts[0], rtol=1e-6)
    assert vectors.keys() == run.importance().keys()


def test_jsonl_and_text_files_are_named_in_the_file(tiny_llama_hf, tmp_path):
    text = tmp_path / "prose.txt"
    text.write_text(" ".join(f"word{i} follows word{i - 1}." for i in range(200)))
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps({"text": f"message number {i} about imatrix files"}) for i in range(50)))
    run = run_imatrix(tiny_llama_hf, [str(text), str(chat)], tmp_path / "im.gguf", n_ctx=32, n_chunks=2)
    assert read_imatrix(tmp_path / "im.gguf").datasets == [str(text), str(chat)]
    assert run.n_chunks == 2


def test_too_short_text_names_found_and_needed_tokens(tiny_llama_hf, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a handful of tokens here")
    with pytest.raises(InputError, match=r"calibration text has \d+ tokens, fewer than one chunk of 512"):
        run_imatrix(tiny_llama_hf, [str(short)], None)


def test_model_folder_without_tokenizer_says_so(tiny_llama_hf, tmp_path):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama_hf / name, tmp_path / name)
    with pytest.raises(InputError, match="no tokenizer in the model folder"):
        run_imatrix(tmp_path, [], None)


def test_cli_writes_an_imatrix_for_the_demo_model(tmp_path, smollm2_hf, monkeypatch):
    monkeypatch.setenv("LLMQUANT_CACHE", str(smollm2_hf.parent))  # the demo folder the fixtures already built
    output = tmp_path / "imatrix.gguf"
    result = CliRunner().invoke(cli, ["imatrix", "smollm2-135m", "--chunks", "2", "--ctx", "128", "-o", str(output)])
    assert result.exit_code == 0, result.output
    assert f"wrote {output}: 210 tensors, 2 chunks of 128 tokens" in result.output
    data = read_imatrix(output)
    assert len(data.entries) == 210 and data.chunk_count == 2 and data.chunk_size == 128
    assert all(entry.counts.tolist() == [256] for entry in data.entries.values())


def test_cli_bad_input_is_one_line_and_exit_1(tiny_llama_hf, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = CliRunner().invoke(cli, ["imatrix", str(tiny_llama_hf), "-f", str(empty), "--ctx", "64"])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: the calibration text has 0 tokens, fewer than one chunk of 64: " \
                                    "give more text or a smaller --ctx"
