"""Saved reference logits: llama-perplexity's kld-base layout, written and read back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmquant.errors import InputError
from llmquant.evaluate.chunks import n_scored
from llmquant.evaluate.reference import (
    MAGIC,
    ReferenceLogits,
    ReferenceWriter,
    dequantize_log_probs,
    is_reference_file,
    quantize_log_probs,
    row_stride,
)


def _logits(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(scale=4.0, size=(n, vocab)).astype(np.float32))


def test_stored_log_probs_are_within_half_a_step_over_the_top_16_nats():
    logits = _logits(8, 1001)
    exact = torch.log_softmax(logits.double(), dim=1)
    stored = dequantize_log_probs(quantize_log_probs(logits), 1001).double()
    top = exact.max(dim=1, keepdim=True).values
    kept = exact > top - 16
    step = 16 / 65535
    assert float((stored - exact)[kept].abs().max()) < 0.5 * step + 1e-5
    # below the window every value sits at the floor, excluded from KLD as llama.cpp excludes it
    assert bool((stored[~kept] <= top.expand_as(exact)[~kept] - 16 + 1e-4).all())


def test_rows_follow_llama_cpp_layout():
    logits = _logits(3, 7)
    rows = quantize_log_probs(logits)
    assert rows.shape == (3, row_stride(7)) == (3, 12)  # two floats, 7 values, padded to even
    scale, min_log_prob = rows[:, :4].copy().view(np.float32).T
    span = (logits.max(1).values - torch.maximum(logits.min(1).values, logits.max(1).values - 16)).numpy()
    np.testing.assert_allclose(scale, span / 65535, rtol=1e-6)
    assert (rows[np.arange(3), 4 + logits.argmax(1).numpy()] == 65535).all()  # the top logit is the top level
    np.testing.assert_allclose(min_log_prob + scale * 65535, torch.log_softmax(logits, 1).max(1).values, atol=1e-5)


def test_file_round_trip(tmp_path):
    tokens = np.arange(3 * 16, dtype=np.int32).reshape(3, 16)
    chunks = [_logits(n_scored(16), 11, seed=i) for i in range(3)]
    writer = ReferenceWriter(tmp_path / "ref.logits", tokens, 11)
    for c in chunks:
        writer.add_chunk(c)
    path = writer.close()
    assert is_reference_file(path) and path.read_bytes()[:8] == MAGIC
    ref = ReferenceLogits(path)
    assert (ref.n_ctx, ref.n_vocab, ref.n_chunks) == (16, 11, 3)
    np.testing.assert_array_equal(ref.tokens, tokens)
    for i, c in enumerate(chunks):
        exact = torch.log_softmax(c, 1)
        kept = exact > exact.max(1, keepdim=True).values - 16  # the stored window
        torch.testing.assert_close(ref.chunk_log_probs(i)[kept], exact[kept], atol=2e-4, rtol=0)


def test_unfinished_file_never_appears_under_its_name(tmp_path):
    writer = ReferenceWriter(tmp_path / "ref.logits", np.zeros((2, 16), dtype=np.int32), 11)
    writer.add_chunk(_logits(n_scored(16), 11))
    with pytest.raises(ValueError, match="1 of 2 chunks"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_truncated_file_is_an_input_error(tmp_path):
    writer = ReferenceWriter(tmp_path / "ref.logits", np.zeros((1, 16), dtype=np.int32), 11)
    writer.add_chunk(_logits(n_scored(16), 11))
    path = writer.close()
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(InputError, match="truncated"):
        ReferenceLogits(path)
    other = tmp_path / "notes.txt"
    other.write_text("hello there, not logits")
    with pytest.raises(InputError, match="not a reference-logits file"):
        ReferenceLogits(other)
