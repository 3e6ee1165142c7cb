"""Chunking as llama-perplexity does it: whole chunks, at least two, the second half of each scored."""

from __future__ import annotations

import numpy as np
import pytest

from llmquant.errors import InputError
from llmquant.evaluate.chunks import first_scored, model_input, n_scored, scored_targets, split_into_chunks


def test_keeps_whole_chunks_up_to_the_limit():
    tokens = list(range(1000))
    assert split_into_chunks(tokens, 128).shape == (7, 128)
    chunks = split_into_chunks(tokens, 128, max_chunks=3)
    assert chunks.shape == (3, 128) and chunks[2, 0] == 256


def test_text_shorter_than_two_chunks_names_its_token_count():
    with pytest.raises(InputError, match=r"only 255 tokens; --ctx 128 needs at least 256"):
        split_into_chunks(list(range(255)), 128)


def test_second_half_is_scored():
    chunk = np.arange(128)
    assert first_scored(128) == 64 and n_scored(128) == 63
    # the logits at positions 64..126 predict tokens 65..127
    np.testing.assert_array_equal(scored_targets(chunk), np.arange(65, 128))
    assert n_scored(129) == 128 - 64 == len(scored_targets(np.arange(129)))


def test_bos_replaces_the_first_token_only_when_the_vocab_adds_it():
    chunk = np.array([5, 6, 7, 8], dtype=np.int32)
    assert model_input(chunk, 1).tolist() == [1, 6, 7, 8]
    assert model_input(chunk, None).tolist() == [5, 6, 7, 8]
    assert chunk.tolist() == [5, 6, 7, 8]
