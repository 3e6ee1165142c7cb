"""Tokenization and chunking as llama-imatrix does them (llama.cpp itself is the oracle for the tokens)."""

from __future__ import annotations

import shutil

import llama_cpp
import pytest

from llmquant.calibration.chunking import (
    chunk_text,
    load_tokenizer,
    make_chunks,
    tokenize_like_llama_cpp,
    tokenizer_adds_bos,
)
from llmquant.errors import InputError

# special-token text must stay ordinary text: llama-imatrix tokenizes with parse_special=false
TEXT = "The importance matrix <|im_start|>weights each column; naïve café 1234567 — done.\n\n  Indented line."


@pytest.fixture(scope="module")
def llama_vocab(smollm2_gguf):
    return llama_cpp.Llama(str(smollm2_gguf), vocab_only=True, verbose=False)


def test_tokens_equal_llama_cpp_tokenization(smollm2_hf, llama_vocab):
    tokenizer = load_tokenizer(smollm2_hf)
    vocab = llama_cpp.llama_model_get_vocab(llama_vocab.model)
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    assert tokenizer_adds_bos(tokenizer) == add_bos
    expected = llama_vocab.tokenize(TEXT.encode(), add_bos=add_bos, special=False)
    assert tokenize_like_llama_cpp(tokenizer, TEXT) == expected


def test_every_chunk_starts_with_bos_when_the_vocab_adds_bos():
    tokens = [7] + list(range(100, 140))  # a BOS-less vocabulary would leave these untouched
    chunks = make_chunks(tokens, n_ctx=10, bos_id=1)
    assert chunks.n_chunks == 4 and chunks.token_ids[:, 0].tolist() == [1, 1, 1, 1]
    assert chunks.token_ids[:, 1:].tolist() == chunks.targets[:, 1:].tolist()
    assert chunks.targets.flatten().tolist() == tokens[:40]


def test_chunks_drop_the_partial_tail_and_respect_max_chunks():
    tokens = list(range(95))
    assert make_chunks(tokens, 20).n_chunks == 4
    only_two = make_chunks(tokens, 20, max_chunks=2)
    assert only_two.token_ids.tolist() == [tokens[:20], tokens[20:40]]


def test_too_short_text_says_how_many_tokens_it_found_and_needs(smollm2_hf):
    tokenizer = load_tokenizer(smollm2_hf)
    n_tokens = len(tokenize_like_llama_cpp(tokenizer, "just a few words"))
    with pytest.raises(InputError, match=rf"has {n_tokens} tokens, fewer than one chunk of 512"):
        chunk_text(tokenizer, "just a few words", 512)
    with pytest.raises(InputError, match=r"has 0 tokens"):
        chunk_text(tokenizer, "", 512)


def test_folder_without_tokenizer_says_so(smollm2_hf, tmp_path):
    shutil.copy(smollm2_hf / "config.json", tmp_path / "config.json")
    with pytest.raises(InputError, match="no tokenizer in the model folder"):
        load_tokenizer(tmp_path)
