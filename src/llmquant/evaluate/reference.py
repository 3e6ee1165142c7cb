"""Reference log-probabilities on disk, in llama-perplexity's ``--kl-divergence-base`` file format.

One reference run serves every quant compared against it. We write and read llama.cpp's own layout
(perplexity.cpp: ``perplexity()`` writes it, ``kl_divergence()`` reads it), so a file from
``llama-perplexity --kl-divergence-base`` works as ``--reference`` here and ours works there::

    "_logits_"  uint32 n_ctx  int32 n_vocab  int32 n_chunk  int32 tokens[n_chunk * n_ctx]
    then for each chunk, for each scored position (n_ctx - 1 - n_ctx/2 of them), nv = 2*((n_vocab+1)/2) + 4 uint16:
        float32 scale, float32 min_log_prob, then n_vocab uint16 q:  log p = scale * q + min_log_prob

The log-probs span the top 16 nats in 65535 steps (2.4e-4 nats each): finer than float16 near 0 and the same
size, about 2 bytes per vocabulary entry per scored token (a 512-token chunk of a 128k vocabulary: 65 MB).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from llmquant.errors import InputError
from llmquant.evaluate.chunks import n_scored

MAGIC = b"_logits_"
HEADER_BYTES = len(MAGIC) + 4 + 4 + 4
LOG_PROB_RANGE = 16.0  # perplexity.cpp: min_logit = max(min_logit, max_logit - 16)
LEVELS = 65535.0


def row_stride(n_vocab: int) -> int:
    """uint16 values per scored token: two float32 (scale, min_log_prob) then n_vocab, padded to even."""
    return 2 * ((n_vocab + 1) // 2) + 4


def is_reference_file(path: str | os.PathLike) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as fh:
        return fh.read(len(MAGIC)) == MAGIC


def quantize_log_probs(logits: torch.Tensor) -> np.ndarray:
    """Logits [n, vocab] → llama.cpp's stored rows uint16 [n, row_stride], as perplexity.cpp's log_softmax."""
    x = logits.detach().to(torch.float32).cpu()
    n, n_vocab = x.shape
    max_logit = x.max(dim=1, keepdim=True).values
    min_logit = torch.maximum(x.min(dim=1, keepdim=True).values, max_logit - LOG_PROB_RANGE)
    log_sum_exp = torch.exp(x - max_logit).to(torch.float64).sum(dim=1, keepdim=True).log().to(torch.float32)
    min_log_prob = min_logit - max_logit - log_sum_exp
    scale = (max_logit - min_logit) / LEVELS
    inv_scale = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    # nearest_int in perplexity.cpp rounds half to even, as torch.round does; logits at or below the floor store 0
    q = torch.where(x > min_logit, torch.round(inv_scale * (x - min_logit)), torch.zeros_like(x))
    rows = np.zeros((n, row_stride(n_vocab)), dtype=np.uint16)
    header = torch.cat([scale, min_log_prob], dim=1).numpy().astype(np.float32)
    rows[:, :4] = header.view(np.uint16).reshape(n, 4)
    rows[:, 4:4 + n_vocab] = q.numpy().astype(np.uint16)
    return rows


def dequantize_log_probs(rows: np.ndarray, n_vocab: int) -> torch.Tensor:
    """Stored rows uint16 [n, row_stride] → log-probs float32 [n, vocab]."""
    rows = np.ascontiguousarray(rows)
    header = rows[:, :4].copy().view(np.float32)  # [n, 2]: scale, min_log_prob
    scale = torch.from_numpy(header[:, :1].copy())
    min_log_prob = torch.from_numpy(header[:, 1:2].copy())
    q = torch.from_numpy(rows[:, 4:4 + n_vocab].astype(np.float32))
    return scale * q + min_log_prob


class ReferenceWriter:
    """Writes a reference file chunk by chunk; the file appears under its name only when complete."""

    def __init__(self, path: str | os.PathLike, tokens: np.ndarray, n_vocab: int) -> None:
        self.path = Path(path)
        self.tokens = np.asarray(tokens, dtype=np.int32)
        self.n_chunks, self.n_ctx = self.tokens.shape
        self.n_vocab = n_vocab
        self._written = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.partial")
        self._fh = self._tmp.open("wb")
        self._fh.write(MAGIC)
        self._fh.write(np.array([self.n_ctx], dtype=np.uint32).tobytes())
        self._fh.write(np.array([n_vocab, self.n_chunks], dtype=np.int32).tobytes())
        self._fh.write(self.tokens.tobytes())

    def add_chunk(self, scored_logits: torch.Tensor) -> None:
        """The reference's logits at one chunk's scored positions, [n_ctx - 1 - n_ctx/2, vocab]."""
        expected = (n_scored(self.n_ctx), self.n_vocab)
        if tuple(scored_logits.shape) != expected:
            raise ValueError(f"reference chunk logits have shape {tuple(scored_logits.shape)}, expected {expected}")
        self._fh.write(quantize_log_probs(scored_logits).tobytes())
        self._written += 1

    def close(self) -> Path:
        self._fh.close()
        if self._written != self.n_chunks:
            self._tmp.unlink(missing_ok=True)
            raise ValueError(f"{self.path}: {self._written} of {self.n_chunks} chunks written")
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._fh.close()
        self._tmp.unlink(missing_ok=True)


class ReferenceLogits:
    """A reference file, memory-mapped: its tokens and each chunk's reference log-probs."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.source = str(self.path)  # what the log-probs came from, for reports (the model when run just now)
        size = self.path.stat().st_size if self.path.is_file() else -1
        if size < 0:
            raise InputError(f"{self.path}: no such reference file")
        with self.path.open("rb") as fh:
            head = fh.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[:len(MAGIC)] != MAGIC:
            raise InputError(f"{self.path}: not a reference-logits file (expected it to start with {MAGIC!r}, "
                             f"as --save-reference and llama-perplexity --kl-divergence-base write)")
        self.n_ctx = int(np.frombuffer(head, dtype=np.uint32, count=1, offset=8)[0])
        self.n_vocab, self.n_chunks = (int(v) for v in np.frombuffer(head, dtype=np.int32, count=2, offset=12))
        if self.n_ctx < 4 or self.n_vocab < 1 or self.n_chunks < 1:
            raise InputError(f"{self.path}: corrupt reference header (n_ctx {self.n_ctx}, n_vocab {self.n_vocab}, "
                             f"chunks {self.n_chunks})")
        tokens_bytes = 4 * self.n_ctx * self.n_chunks
        self._stride = row_stride(self.n_vocab)
        chunk_values = n_scored(self.n_ctx) * self._stride
        expected = HEADER_BYTES + tokens_bytes + 2 * chunk_values * self.n_chunks
        if size != expected:
            raise InputError(f"{self.path}: {size} bytes, but {self.n_chunks} chunks of {self.n_ctx} tokens over "
                             f"{self.n_vocab} vocabulary entries need {expected}: truncated or not a reference file")
        self.tokens = np.fromfile(self.path, dtype=np.int32, count=self.n_ctx * self.n_chunks,
                                  offset=HEADER_BYTES).reshape(self.n_chunks, self.n_ctx)
        self._rows = np.memmap(self.path, dtype=np.uint16, mode="r", offset=HEADER_BYTES + tokens_bytes,
                               shape=(self.n_chunks, n_scored(self.n_ctx), self._stride))

    def chunk_log_probs(self, index: int) -> torch.Tensor:
        """Chunk ``index``'s reference log-probs at its scored positions, float32 [n_scored, vocab]."""
        return dequantize_log_probs(np.asarray(self._rows[index]), self.n_vocab)


__all__ = ["MAGIC", "ReferenceLogits", "ReferenceWriter", "dequantize_log_probs", "is_reference_file",
           "quantize_log_probs", "row_stride"]
